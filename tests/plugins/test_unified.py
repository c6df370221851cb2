"""The unified view: sites per design dimension, exact counts per form and scaling, the forms' maths."""

from __future__ import annotations

import pytest
import torch

from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.parts.bottleneck import bottleneck_count
from petlsearch.plugins.checks import _perturb
from petlsearch.plugins.unified import UnifiedView
from tests.helpers import frozen_tiny as _frozen


def _run(model, family: str = "bert") -> torch.Tensor:
    with torch.no_grad():
        return tiny.output_tensor(model(**tiny.inputs(family)))


def _site(plugin, graph, kind: str, role: str, layer: int = 0):
    return next(s for s in plugin.sites(graph) if s.kind == kind and s.role == role and s.layer == layer)


def test_sites_cover_insertion_form_times_representation():
    plugin = UnifiedView()
    _, graph = _frozen()
    got = sorted((s.kind, s.role) for s in plugin.sites(graph))
    want = sorted([(k, r) for k in ("sequential", "parallel") for r in ("attn", "ffn")] * 2
                  + [("kv_prefix", "attn")] * 2)
    assert got == want
    assert plugin.config(_site(plugin, graph, "parallel", "ffn"))["scaling"] == 4.0
    assert plugin.config(_site(plugin, graph, "kv_prefix", "attn"))["length"] == 30


@pytest.mark.parametrize("form", ["adapter", "lora"])
@pytest.mark.parametrize("mode", ["fixed", "learned"])
def test_counts_by_formula(form, mode):
    plugin = UnifiedView()
    model, graph = _frozen("llama")  # ffn sublayer: 32 -> 32
    seq = _site(plugin, graph, "sequential", "ffn")
    par = _site(plugin, graph, "parallel", "ffn")
    cfg = {"form": form, "bottleneck": 4, "scaling_mode": mode}
    extra = 1 if mode == "learned" else 0
    assert (seq.out_features, par.in_features, par.out_features) == (32, 32, 32)
    low = (lambda fin, fout: 4 * (fin + fout)) if form == "lora" else (lambda fin, fout: bottleneck_count(fin, 4, fout))
    assert plugin.count(seq, plugin.config(seq, cfg)) == low(32, 32) + extra  # reads the sublayer's output
    assert plugin.count(par, plugin.config(par, cfg)) == low(32, 32) + extra  # reads the sublayer's input
    mods = [plugin.attach(model, s, cfg) for s in (seq, par)]  # both on ffn.down: distinct children
    assert [m.trainable_count() for m in mods] == [plugin.count(s, plugin.config(s, cfg)) for s in (seq, par)]


def test_lora_form_is_scaled_low_rank_beside_the_sublayer():
    plugin = UnifiedView()
    model, graph = _frozen()
    site = _site(plugin, graph, "parallel", "ffn", layer=1)
    module = plugin.attach(model, site, {"form": "lora", "bottleneck": 3, "scaling": 2.0})
    _perturb(module)
    seen = {}
    source = model.get_submodule(site.source)
    h1 = source.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    h2 = model.get_submodule(site.path).register_forward_hook(lambda _m, _a, o: seen.__setitem__("out", o))
    module.gate = 0.0
    _run(model)
    base_out = seen["out"]
    module.gate = 1.0
    _run(model)
    h1.remove()
    h2.remove()
    a, b = module.fn.lora_A, module.fn.lora_B
    torch.testing.assert_close(seen["out"], base_out + 2.0 * seen["x"] @ a.T @ b.T)


def test_every_branch_is_identity_at_init_and_scaling_can_be_learned():
    plugin = UnifiedView()
    model, graph = _frozen()
    base = _run(model)
    mods = []
    for i, s in enumerate(s for s in plugin.sites(graph) if s.kind != "kv_prefix"):
        cfg = {"form": ("adapter", "lora")[i % 2], "scaling_mode": "learned", "activation": "gelu"}
        mods.append(plugin.attach(model, s, cfg))
    assert torch.allclose(_run(model), base, atol=1e-7)
    for m in mods:
        _perturb(m)
    tiny.output_tensor(model(**tiny.inputs("bert"))).sum().backward()
    assert all(isinstance(m.scale, torch.nn.Parameter) and m.scale.grad is not None for m in mods)


def test_all_kinds_together_and_gate_zero():
    plugin = UnifiedView()
    model, graph = _frozen("gpt2")
    base = _run(model, "gpt2")
    mods = [plugin.attach(model, s) for s in plugin.sites(graph)]
    assert {m.child_name for m in mods} == {"petl_unified", "petl_unified_sequential", "petl_unified_parallel"}
    for m in mods:
        _perturb(m)
    assert (_run(model, "gpt2") - base).abs().max() > 1e-6
    for m in mods:
        m.gate = torch.tensor(0.0)
    assert torch.equal(_run(model, "gpt2"), base)
    for m in mods:
        m.uninstall()
    assert model.config._attn_implementation == "sdpa"
