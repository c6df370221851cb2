"""Compacter / Compacter++: Kronecker structure, shared slow weights counted once, exact counts, dims."""

from __future__ import annotations

import torch

from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.compacter import Compacter, CompacterAdapter, CompacterPlusPlus
from petlsearch.plugins.parts.kronecker import kron_sum
from tests.helpers import frozen_tiny as _frozen
from tests.helpers import trainable_numel as _trainable


def test_kron_sum_is_sum_of_kronecker_products():
    a, b = torch.randn(3, 3, 3), torch.randn(3, 2, 5)
    expected = sum(torch.kron(a[i], b[i]) for i in range(3))
    assert torch.allclose(kron_sum(a, b), expected, atol=1e-6)


def test_phm_weights_are_kronecker_of_shared_slow_and_low_rank_fast():
    model, graph = _frozen()
    plugin = Compacter()
    site = plugin.sites(graph)[0]
    m = plugin.attach(model, site, {"n": 4, "bottleneck": 8, "rank": 2})
    a = m.shared_slow.A  # (4, 4, 4)
    fast = m.down.s @ m.down.t  # (4, 8/4, 32/4): each B_i has rank <= 2
    assert all(torch.linalg.matrix_rank(fast[i]) <= 2 for i in range(4))
    w = sum(torch.kron(a[i], fast[i]) for i in range(4))
    assert w.shape == (8, 32) and torch.allclose(m.down.weight(a), w, atol=1e-6)
    assert torch.equal(m.up.weight(a), torch.zeros(32, 8))  # identity at init


def test_slow_weights_shared_and_counted_once():
    model, graph = _frozen()
    plugin = Compacter()
    sites = plugin.sites(graph)
    cfg = {"n": 4, "bottleneck": 16, "rank": 1}
    modules = [plugin.attach(model, s, cfg) for s in sites]
    assert len({id(m.shared_slow) for m in modules}) == 1
    d, b = 32, 16
    per_layer = 2 * 1 * (d + b) + b + d  # fast weights of down and up, and both biases
    assert all(plugin.count(s, plugin.config(s, cfg)) == per_layer == m.trainable_count()
               for s, m in zip(sites, modules))
    assert plugin.shared_count(sites[0], plugin.config(sites[0], cfg)) == 4 ** 3
    assert _trainable(model) == len(sites) * per_layer + 4 ** 3
    # a different n is a different set of slow weights
    other = plugin.build(sites[0], plugin.config(sites[0], {"n": 2, "bottleneck": 16}))
    assert other.shared_slow is not modules[0].shared_slow and other.shared_slow.A.shape == (2, 2, 2)


def test_dims_offer_only_valid_n_and_widths():
    plugin = Compacter()
    _, graph = _frozen()
    dims = plugin.dims(plugin.sites(graph)[0])
    assert dims["n"].choices == (2, 4, 8)  # 12 does not divide d = 32
    assert dims["bottleneck"].choices == (8, 16, 32)
    assert all(b % n == 0 for b in dims["bottleneck"].choices for n in dims["n"].choices)


def test_compacter_places_after_attention_and_ffn_and_pp_after_ffn_only():
    _, graph = _frozen()
    assert sorted(s.role for s in Compacter().sites(graph)) == ["attn", "attn", "ffn", "ffn"]
    assert [s.role for s in CompacterPlusPlus().sites(graph)] == ["ffn", "ffn"]


def test_adapter_trains_and_changes_the_output():
    model, graph = _frozen()
    plugin = CompacterPlusPlus()
    modules = [plugin.attach(model, s) for s in plugin.sites(graph)]
    assert all(isinstance(m, CompacterAdapter) for m in modules)
    batch = tiny.inputs("bert")
    loss = model(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert modules[0].up.t.grad is not None and modules[0].up.t.grad.abs().sum() > 0
    assert modules[0].shared_slow.A.grad is None or modules[0].shared_slow.A.grad.abs().sum() == 0  # up is 0
