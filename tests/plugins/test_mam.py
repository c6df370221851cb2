"""MAM adapter: the paper's defaults, exact counts for both parts, identity of the adapter part."""

from __future__ import annotations

import torch

from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.mam import MAMAdapter
from petlsearch.plugins.parts.bottleneck import ParallelAdapterModule, bottleneck_count
from petlsearch.plugins.parts.prefix import PrefixModule
from petlsearch.plugins.checks import _perturb
from tests.helpers import frozen_tiny as _frozen
from tests.helpers import trainable_numel as _trainable


def _run(model, family: str = "bert") -> torch.Tensor:
    with torch.no_grad():
        return tiny.output_tensor(model(**tiny.inputs(family)))


def test_sites_and_paper_defaults():
    plugin = MAMAdapter()
    _, graph = _frozen()
    sites = plugin.sites(graph)
    assert sorted((s.kind, s.role) for s in sites) == [("kv_prefix", "attn")] * 2 + [("parallel", "ffn")] * 2
    prefix = next(s for s in sites if s.kind == "kv_prefix")
    ffn = next(s for s in sites if s.kind == "parallel")
    assert plugin.config(prefix) == {"length": 30, "reparam": True, "mlp_hidden": 800}
    # bottleneck 512 capped by the hidden size (32 here), scaled by s = 4
    assert plugin.config(ffn) == {"bottleneck": 32, "activation": "relu", "scaling": 4.0}


def test_counts_of_both_parts():
    plugin = MAMAdapter()
    model, graph = _frozen()
    sites = plugin.sites(graph)
    prefix = [s for s in sites if s.kind == "kv_prefix"]
    ffn = [s for s in sites if s.kind == "parallel"]
    pcfg = plugin.config(prefix[0], {"length": 6, "mlp_hidden": 20})
    acfg = plugin.config(ffn[0], {"bottleneck": 8})
    assert plugin.count(prefix[0], pcfg) == (20 + 1) * 2 * 32
    assert plugin.shared_count(prefix[0], pcfg) == 6 * 32 + 32 * 20 + 20
    assert plugin.count(ffn[0], acfg) == bottleneck_count(32, 8, 32)
    assert plugin.shared_key(ffn[0], acfg) is None
    mods = [plugin.attach(model, s, pcfg) for s in prefix] + [plugin.attach(model, s, acfg) for s in ffn]
    assert isinstance(mods[0], PrefixModule) and isinstance(mods[-1], ParallelAdapterModule)
    assert mods[-1].adapter.scaling == 4.0
    expected = 2 * plugin.count(prefix[0], pcfg) + plugin.shared_count(prefix[0], pcfg) + 2 * plugin.count(ffn[0], acfg)
    assert _trainable(model) == expected


def test_adapter_part_is_identity_at_init_and_prefix_part_is_not():
    plugin = MAMAdapter()
    model, graph = _frozen()
    base = _run(model)
    sites = plugin.sites(graph)
    adapters = [plugin.attach(model, s) for s in sites if s.kind == "parallel"]
    assert torch.allclose(_run(model), base, atol=1e-7)
    for m in adapters:
        _perturb(m)
    assert (_run(model) - base).abs().max() > 1e-6
    for m in adapters:
        m.uninstall()
    for s in sites:
        if s.kind == "kv_prefix":
            plugin.attach(model, s)
    assert (_run(model) - base).abs().max() > 1e-6


def test_gate_zero_on_both_parts_restores_the_model():
    plugin = MAMAdapter()
    model, graph = _frozen("gpt2")
    base = _run(model, "gpt2")
    mods = [plugin.attach(model, s) for s in plugin.sites(graph)]
    for m in mods:
        _perturb(m)
        m.gate = 0.0
    assert torch.equal(_run(model, "gpt2"), base)
