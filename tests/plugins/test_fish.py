"""FISH mask: top-k Fisher selection, sparse update, exact count, persistence, the paper's global mask."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.fish import FishMask, SparseDelta
from petlsearch.scoring import fisher_scores
from petlsearch.searchspace.graph import ModelGraph


def _prepared(num_samples: int = 1024):
    model = tiny.bert()
    for p in model.parameters():
        p.requires_grad_(False)
    graph = ModelGraph.from_model(model)
    batch = {**tiny.inputs("bert"), "labels": torch.tensor([0, 1])}
    plugin = FishMask(num_samples=num_samples)
    plugin.prepare(model, [batch])
    return model, graph, plugin, batch


def _site(plugin: FishMask, graph: ModelGraph, role: str = "attn.q"):
    return next(s for s in plugin.sites(graph) if s.role == role)


def test_mask_keeps_the_top_k_fisher_entries():
    model, graph, plugin, batch = _prepared()
    site = _site(plugin, graph)
    name = f"{site.path}.weight"
    expected = fisher_scores(model, [batch], params=[name])[name]
    assert torch.allclose(plugin.scores(site), expected)
    m = plugin.attach(model, site, {"k": 50})
    assert sorted(m.indices.tolist()) == sorted(expected.flatten().topk(50).indices.tolist())
    kept_min = expected.flatten()[m.indices].min()
    others = torch.ones(expected.numel(), dtype=torch.bool)
    others[m.indices] = False
    assert kept_min >= expected.flatten()[others].max()
    assert m.trainable_count() == plugin.count(site, {"k": 50}) == 50


def test_update_touches_only_masked_entries_and_trains_only_values():
    model, graph, plugin, batch = _prepared()
    site = _site(plugin, graph, "ffn.up")
    m = plugin.attach(model, site, {"k": 7})
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["values"]
    assert m.values.shape == (7,)
    with torch.no_grad():
        m.values.copy_(torch.arange(1.0, 8.0))
    target = model.get_submodule(site.path)
    diff = m.delta_weight().flatten()
    assert torch.equal(diff.nonzero().flatten(), m.indices)
    assert torch.allclose(diff[m.indices], m.values)
    x = torch.randn(3, target.in_features)
    expected = torch.nn.functional.linear(x, target.weight + m.delta_weight(), target.bias)
    assert torch.allclose(target(x), expected, atol=1e-6)
    model(**batch).loss.backward()
    assert m.values.grad is not None and m.values.grad.shape == (7,)
    assert target.weight.grad is None  # the frozen weight gets no dense gradient


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_sparse_linear_gradients_equal_the_dense_update(layout: str):
    from petlsearch.plugins.fish import SparseLinear, sparse_block

    torch.manual_seed(0)
    out_f, in_f = 12, 10
    weight, bias = torch.randn(out_f, in_f), torch.randn(out_f, requires_grad=True)
    # entries in 2 columns of every row (a column block is smaller) or in 2 rows (a row block is)
    grid = torch.arange(out_f * in_f).view(out_f, in_f)
    indices = (grid[:, [3, 7]] if layout == "columns" else grid[[2, 9], :]).flatten().sort().values
    by_rows, block, position = sparse_block(indices, (out_f, in_f))
    assert by_rows == (layout == "rows") and block.numel() == 2
    values = torch.randn(indices.numel(), requires_grad=True)
    x = torch.randn(4, 5, in_f, requires_grad=True)
    y = SparseLinear.apply(x, weight, bias, values, indices, block, position, by_rows)
    dense = weight.clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x, dense + torch.zeros(out_f * in_f).index_add(0, indices, values).view(out_f, in_f), bias)
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, values, bias), g)
    refs = torch.autograd.grad(y_ref, (x, values, bias), g)
    for got, ref in zip(grads, refs):
        assert torch.allclose(got, ref, atol=1e-5)


def test_loading_another_mask_after_install_trains_the_loaded_entries():
    model, graph, plugin, batch = _prepared()
    site = _site(plugin, graph, "attn.q")
    m = plugin.attach(model, site, {"k": 9})
    target = model.get_submodule(site.path)
    loaded = torch.randperm(target.weight.numel())[:9].sort().values
    m.load_state_dict({"indices": loaded, "values": torch.randn(9)})
    x = torch.randn(2, 3, target.in_features)
    target(x).pow(2).sum().backward()
    dense = (target.weight.detach().flatten().index_add(0, loaded, m.values.detach())).view_as(target.weight)
    dense.requires_grad_(True)
    torch.nn.functional.linear(x, dense, target.bias).pow(2).sum().backward()
    assert torch.allclose(m.values.grad, dense.grad.flatten()[loaded], atol=1e-5)


def test_build_without_prepare_is_a_clear_error():
    model = tiny.bert()
    plugin = FishMask()
    site = plugin.sites(ModelGraph.from_model(model))[0]
    with pytest.raises(PluginError, match="prepare"):
        plugin.attach(model, site)


def test_mask_survives_safetensors_and_merges():
    from safetensors.torch import load_file, save_file

    model, graph, plugin, batch = _prepared()
    site = _site(plugin, graph, "attn.v")
    m = plugin.attach(model, site, {"k": 20})
    with torch.no_grad():
        m.values.normal_()
    assert "indices" in m.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(Path(tmp) / "m.safetensors"))
        state = load_file(str(Path(tmp) / "m.safetensors"))
    fresh = SparseDelta(site, torch.zeros(20, dtype=torch.long), site.get("shape"))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.indices, m.indices) and torch.equal(fresh.delta_weight(), m.delta_weight())
    with torch.no_grad():
        expected = model(**batch).logits
        m.merge()
        assert torch.allclose(model(**batch).logits, expected, atol=1e-5)


def test_global_allocation_reproduces_the_papers_global_mask():
    model, graph, plugin, _ = _prepared()
    sites = [s for s in plugin.sites(graph) if s.layer is not None]
    k = 300
    alloc = plugin.global_allocation(sites, k)
    assert sum(alloc.values()) == k
    chosen = set()
    for s in sites:
        if s.key in alloc:
            m = plugin.build(s, {"k": alloc[s.key]})
            chosen |= {(s.key, i) for i in m.indices.tolist()}
    flat = [(float(v), s.key, i) for s in sites for i, v in enumerate(plugin.scores(s).flatten().tolist())]
    threshold = sorted((v for v, _, _ in flat), reverse=True)[k - 1]
    assert all(v >= threshold for v, key, i in flat if (key, i) in chosen)
    assert all((key, i) in chosen for v, key, i in flat if v > threshold)
