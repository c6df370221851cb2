"""VL-Adapter: exact counts under task and layer sharing, per-task routing, per-model shared sets."""

from __future__ import annotations

import pytest
import torch

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.checks import _perturb
from petlsearch.plugins.context import use
from petlsearch.plugins.parts.bottleneck import bottleneck_count
from petlsearch.plugins.testing import check_plugin
from petlsearch.plugins.vl_adapter import SharedAdapter
from tests.helpers import frozen_tiny as _frozen
from tests.helpers import trainable_numel as _trainable


def test_counts_by_formula():
    plugin = SharedAdapter(tasks=("vqa", "gqa", "nlvr"))
    _, graph = _frozen()
    site = plugin.sites(graph)[0]
    one = bottleneck_count(32, 8, 32)
    assert plugin.count(site, plugin.config(site, {"bottleneck": 8})) == one
    assert plugin.count(site, plugin.config(site, {"bottleneck": 8, "share": "none"})) == 3 * one
    cfg = plugin.config(site, {"bottleneck": 8, "share": "none", "share_layers": True})
    assert plugin.count(site, cfg) == 0 and plugin.shared_count(site, cfg) == 3 * one


@pytest.mark.parametrize("share", ["tasks", "none"])
def test_k_placements_sharing_layers_add_one_adapter_set(share):
    plugin = SharedAdapter(tasks=("vqa", "gqa"))
    model, graph = _frozen()
    ffn = [s for s in plugin.sites(graph) if s.role == "ffn"]
    assert len(ffn) == 2
    cfg = {"bottleneck": 4, "share": share, "share_layers": True}
    mods = [plugin.attach(model, s, cfg) for s in ffn]
    copies = 2 if share == "none" else 1
    assert _trainable(model) == copies * bottleneck_count(32, 4, 32)
    assert mods[0].shared_adapters is mods[1].shared_adapters
    assert all(m.trainable_count() == 0 for m in mods)
    # a different sublayer kind gets its own set
    attn = [s for s in plugin.sites(graph) if s.role == "attn"][0]
    plugin.attach(model, attn, cfg)
    assert _trainable(model) == 2 * copies * bottleneck_count(32, 4, 32)


def test_per_task_adapters_route_by_current_task():
    plugin = SharedAdapter(tasks=("vqa", "gqa"))
    model, graph = _frozen()
    inputs = tiny.inputs("bert")
    module = plugin.attach(model, plugin.sites(graph)[0], {"bottleneck": 4, "share": "none"})
    _perturb(module)
    with torch.no_grad():
        with use(task="vqa"):
            vqa = model(**inputs).logits
        with use(task="gqa"):
            gqa = model(**inputs).logits
    assert not torch.allclose(vqa, gqa)
    with pytest.raises(PluginError, match="current task"):
        model(**inputs)
    # only the current task's adapter gets a gradient
    with use(task="gqa"):
        model(**inputs).logits.sum().backward()
    grads = {t: a.down.weight.grad for t, a in module.adapters.adapters.items()}
    assert grads["vqa"] is None and grads["gqa"].abs().sum() > 0


def test_shared_across_tasks_ignores_the_task():
    plugin = SharedAdapter(tasks=("vqa", "gqa"))
    model, graph = _frozen()
    inputs = tiny.inputs("bert")
    _perturb(plugin.attach(model, plugin.sites(graph)[0], {"bottleneck": 4}))
    with torch.no_grad():
        with use(task="vqa"):
            a = model(**inputs).logits
        with use(task="gqa"):
            b = model(**inputs).logits
        c = model(**inputs).logits
    assert torch.equal(a, b) and torch.equal(a, c)


def test_shared_sets_are_per_model():
    plugin = SharedAdapter()
    cfg = {"bottleneck": 4, "share_layers": True}
    m1, g1 = _frozen()
    m2, _ = _frozen()
    a = plugin.attach(m1, plugin.sites(g1)[1], cfg)
    b = plugin.attach(m2, plugin.sites(g1)[1], cfg)
    c = plugin.attach(m1, plugin.sites(g1)[3], cfg)
    assert a.shared_adapters is c.shared_adapters
    assert a.shared_adapters is not b.shared_adapters


def test_gate_zero_with_tensor_gate_and_training_moves_shared_weights():
    plugin = SharedAdapter()
    model, graph = _frozen()
    inputs = tiny.inputs("bert")
    with torch.no_grad():
        base = model(**inputs).logits
    mods = [plugin.attach(model, s, {"bottleneck": 4, "share_layers": True}) for s in plugin.sites(graph)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs).logits[:, 0].sum().backward()
    opt.step()
    with torch.no_grad():
        moved = model(**inputs).logits
        for m in mods:
            m.gate = torch.tensor(0.0)
        off = model(**inputs).logits
    assert not torch.allclose(moved, base) and torch.allclose(off, base, atol=1e-6)


def test_conformance_with_per_task_adapters():
    with use(task="gqa"):
        assert check_plugin(SharedAdapter(tasks=("vqa", "gqa")), families=("bert",)).families == ["bert"]
