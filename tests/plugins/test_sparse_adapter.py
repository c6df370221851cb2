"""SparseAdapter: exact kept counts, masked gradients, the three pruners, SNIP scores, Large-Sparse."""

from __future__ import annotations

import pytest
import torch

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.parts.bottleneck import Bottleneck
from petlsearch.plugins.sparse_adapter import SparseAdapter, kept
from petlsearch.searchspace.graph import ModelGraph


def _frozen():
    model = tiny.bert()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ModelGraph.from_model(model)


def _batch() -> dict:
    return {**tiny.inputs("bert"), "labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("pruner", ["random", "magnitude"])
def test_count_is_exact_and_pruned_weights_get_no_gradient(pruner: str):
    model, graph = _frozen()
    plugin = SparseAdapter(pruner=pruner)
    site = plugin.sites(graph)[0]
    cfg = plugin.config(site, {"bottleneck": 24, "sparsity": 0.7})
    m = plugin.attach(model, site, cfg)
    a = m.adapter
    assert int(a.down_mask.sum()) == int(a.up_mask.sum()) == kept(32 * 24, 0.7) == round(0.3 * 768)
    assert m.trainable_count() == plugin.count(site, cfg) == 2 * 230 + 24 + 32
    assert set(m.state_dict()) >= {"adapter.down_mask", "adapter.up_mask"}
    with torch.no_grad():
        a.up.weight.normal_()
    model(**_batch()).loss.backward()
    assert a.down.weight.grad[~a.down_mask].abs().sum() == 0
    assert a.up.weight.grad[~a.up_mask].abs().sum() == 0
    assert a.down.weight.grad[a.down_mask].abs().sum() > 0
    assert torch.equal(a.down.weight[~a.down_mask], torch.zeros(int((~a.down_mask).sum())))


def test_magnitude_pruner_keeps_largest_initial_weights():
    model, graph = _frozen()
    plugin = SparseAdapter(pruner="magnitude")
    site = plugin.sites(graph)[0]
    torch.manual_seed(3)
    m = plugin.attach(model, site, {"bottleneck": 8, "sparsity": 0.5})
    torch.manual_seed(3)
    reference = Bottleneck(32, 8, 32, "relu")  # the same draw the plugin scored
    w = reference.down.weight.abs().flatten()
    assert torch.equal(m.adapter.down_mask.flatten(), torch.zeros_like(w, dtype=torch.bool).index_fill(
        0, w.topk(128).indices, True))
    assert torch.equal(m.adapter.up.weight, torch.zeros(32, 8))  # identity at init


def test_snip_scores_are_the_gradient_saliency_of_the_attached_adapter():
    model, graph = _frozen()
    plugin = SparseAdapter(pruner="snip")
    site = plugin.sites(graph)[-1]
    with pytest.raises(PluginError, match="prepare"):
        plugin.attach(model, site)
    batch = _batch()
    plugin.prepare(model, [batch])
    torch.manual_seed(0)
    dense = Bottleneck(32, 8, 32, "relu")
    up_ref = torch.randn(32, 8)
    down_score, up_score = plugin.scores(site, dense, up_ref, "relu")
    # reference: attach the dense adapter (up = up_ref) with a tiny gate and take |w * dL/dw| / gate
    plugin_ref = SparseAdapter(pruner="random")
    m = plugin_ref.attach(model, site, {"bottleneck": 8, "sparsity": 0.0})
    m.adapter.load_state_dict({**dense.state_dict(), "up.weight": up_ref,
                               "down_mask": torch.ones(8, 32, dtype=torch.bool),
                               "up_mask": torch.ones(32, 8, dtype=torch.bool)})
    m.gate = 1e-4
    model(**batch).loss.backward()
    ref_down = (m.adapter.down.weight * m.adapter.down.weight.grad).abs().detach() / 1e-4
    ref_up = (m.adapter.up.weight * m.adapter.up.weight.grad).abs().detach() / 1e-4
    assert torch.allclose(down_score, ref_down, rtol=1e-2, atol=1e-6 * float(ref_down.max()))
    assert torch.allclose(up_score, ref_up, rtol=1e-2, atol=1e-6 * float(ref_up.max()))
    built = plugin.attach(tiny.bert(), site, {"bottleneck": 8, "sparsity": 0.5})
    assert int(built.adapter.down_mask.sum()) == 128


def test_large_sparse_keeps_the_budget_with_a_wider_adapter():
    plugin = SparseAdapter(pruner="random")
    _, graph = _frozen()
    site = plugin.sites(graph)[0]
    base = plugin.config(site, {"bottleneck": 16, "sparsity": 0.5})
    wide = plugin.config(site, plugin.large_sparse(base, 2))
    assert wide["bottleneck"] == 32 and wide["sparsity"] == pytest.approx(0.75)
    weights = lambda cfg: plugin.count(site, cfg) - cfg["bottleneck"] - 32  # noqa: E731 (biases apart)
    assert weights(wide) == weights(base) == 2 * 256
    assert plugin.dims(site)["bottleneck"].high == 64  # wider than d: Large-Sparse
