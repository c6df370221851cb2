"""KAdaptation: the update is a sum of Kronecker products, slow weights shared, merge, site selection."""

from __future__ import annotations

import torch

from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.kadaptation import KAdaptation
from petlsearch.plugins.checks import _perturb
from petlsearch.scoring import IntrinsicDimension
from tests.helpers import frozen_tiny as _frozen


def _run(model, family: str = "bert") -> torch.Tensor:
    with torch.no_grad():
        return tiny.output_tensor(model(**tiny.inputs(family)))


def test_update_is_scaled_sum_of_kronecker_products():
    model, graph = _frozen()
    plugin = KAdaptation()
    site = plugin.sites(graph)[0]
    m = plugin.attach(model, site, {"n": 4, "rank": 2, "alpha": 4})
    assert torch.equal(m.delta_weight(), torch.zeros(32, 32))  # v = 0 at init
    _perturb(m)
    a, u, v = m.shared_slow.A, m.u, m.v
    expected = sum(torch.kron(a[i], u[i] @ v[i]) for i in range(4)) * (4 / 2)
    assert torch.allclose(m.delta_weight(), expected, atol=1e-5)
    target = model.get_submodule(site.path)
    assert torch.allclose(target.weight, target.parametrizations.weight.original + expected, atol=1e-5)


def test_shared_slow_weights_counted_once():
    model, graph = _frozen()
    plugin = KAdaptation()
    sites = plugin.sites(graph)
    assert {s.role for s in sites} == {"attn.q", "attn.k", "attn.v", "attn.o"}
    before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = [plugin.attach(model, s, {"n": 2, "rank": 3}) for s in sites]
    assert len({id(m.shared_slow) for m in modules}) == 1
    assert all(m.trainable_count() == plugin.count(s, plugin.config(s, {"n": 2, "rank": 3})) == 3 * (32 + 32)
               for s, m in zip(sites, modules))
    added = sum(p.numel() for p in model.parameters() if p.requires_grad) - before
    assert added == len(sites) * 3 * 64 + 2 ** 3


def test_gpt2_fused_qkv_in_conv1d_layout_merges():
    model, graph = _frozen("gpt2")
    plugin = KAdaptation()
    site = next(s for s in plugin.sites(graph) if s.role == "attn.qkv")
    assert site.get("shape") == (32, 96)  # Conv1D stores (in, out)
    assert 16 in plugin.dims(site)["n"].choices  # divides 32 and 96
    m = plugin.attach(model, site, {"n": 16, "rank": 1})
    _perturb(m)
    expected = _run(model, "gpt2")
    m.merge()
    assert not hasattr(model.get_submodule(site.path), "parametrizations")
    assert torch.allclose(_run(model, "gpt2"), expected, atol=1e-4)


def test_rank_sites_by_local_intrinsic_dimension():
    model, graph = _frozen()
    batch = {**tiny.inputs("bert"), "labels": torch.tensor([0, 1])}
    ranked = KAdaptation().rank_sites(model, graph, [batch], dims=(1,), steps=1, threshold=0.0)
    assert len(ranked) == 8 and all(isinstance(d, IntrinsicDimension) for _, d in ranked)
    keys = [(float("inf") if d.dimension is None else d.dimension) for _, d in ranked]
    assert keys == sorted(keys)
    q = next(d for s, d in ranked if s.role == "attn.q")
    assert q.submodule.endswith("attention.self") and q.num_params == 3 * (32 * 32 + 32)
