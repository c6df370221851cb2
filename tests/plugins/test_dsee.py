"""DSEE: low-rank + sparse update, the support from the weight's decomposition or from data, pruning."""

from __future__ import annotations

import math

import torch

from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.dsee import DSEE, prune, residual_support
from petlsearch.plugins.checks import _perturb
from petlsearch.searchspace.graph import ModelGraph


def _frozen():
    model = tiny.bert()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ModelGraph.from_model(model)


def test_residual_support_finds_the_sparse_part_of_low_rank_plus_sparse():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    spikes = torch.randperm(1200, generator=g)[:25]
    w = low.flatten().clone()
    w[spikes] += 10.0  # outliers of a few times the low-rank part
    support = residual_support(w.view(40, 30), rank=3, entries=25)
    assert sorted(support.tolist()) == sorted(spikes.tolist())


def test_update_is_low_rank_plus_sparse_and_count_exact():
    model, graph = _frozen()
    plugin = DSEE()
    site = next(s for s in plugin.sites(graph) if s.role == "ffn.up")  # weight (64, 32)
    cfg = plugin.config(site, {"rank": 2, "sparse": 10, "alpha": 4})
    m = plugin.attach(model, site, cfg)
    assert m.trainable_count() == plugin.count(site, cfg) == 2 * (64 + 32) + 10
    weight = model.get_submodule(site.path).parametrizations.weight.original
    assert torch.equal(m.indices, residual_support(weight, 2, 10))
    _perturb(m)
    dense_s = torch.zeros(64 * 32).index_add(0, m.indices, m.sparse.detach()).view(64, 32)
    expected = m.lora_B @ m.lora_A * (4 / 2) + dense_s
    assert torch.allclose(model.get_submodule(site.path).weight, weight + expected, atol=1e-5)
    assert torch.allclose(m.delta_weight(), expected, atol=1e-5)


def test_support_follows_data_scores_when_prepared():
    model, graph = _frozen()
    plugin = DSEE(data_score="snip")
    batch = {**tiny.inputs("bert"), "labels": torch.tensor([0, 1])}
    plugin.prepare(model, [batch])
    site = next(s for s in plugin.sites(graph) if s.role == "attn.v")
    m = plugin.attach(model, site, {"sparse": 12})
    scores = plugin._scores[f"{site.path}.weight"]
    assert sorted(m.indices.tolist()) == sorted(scores.flatten().topk(12).indices.tolist())


def test_magnitude_pruning_report():
    model, graph = _frozen()
    total = sum(p.numel() for p in model.parameters())
    plugin = DSEE()
    m = plugin.attach(model, plugin.sites(graph)[0], {"rank": 2})
    _perturb(m)
    report = prune(model, "magnitude", sparsity=0.75, seq_len=10)
    assert not any(hasattr(mod, "parametrizations") for mod in model.modules())  # merged first
    # per layer: q, k, v, o (32 x 32), up (64 x 32), down (32 x 64), each keeping a quarter
    kept_per_layer = 4 * 256 + 2 * 512
    removed = 2 * (4 * 32 * 32 + 2 * 2048 - kept_per_layer)
    assert report.removed == removed and report.params == total - removed
    dense_linear = 32 * 32 + 2 * 32  # the pooler and the classifier stay dense
    attention = 2 * 2 * 10 * 10 * 8 * 4
    assert report.flops == 2 * 10 * (2 * kept_per_layer + dense_linear) + 2 * attention
    q = model.bert.encoder.layer[0].attention.self.query.weight
    assert int((q != 0).sum()) == 256


def test_head_pruning_equals_masking_the_heads():
    model, _ = _frozen()
    inputs = tiny.inputs("bert")
    total = sum(p.numel() for p in model.parameters())
    report = prune(model, "heads", sparsity=0.5, seq_len=10)
    assert sorted(report.pruned_heads) == ["encoder.L0.attn", "encoder.L1.attn"]
    assert all(len(h) == 2 for h in report.pruned_heads.values())
    per_layer = 3 * 2 * (8 * 32 + 8) + 2 * 8 * 32  # q, k, v rows and biases; o columns
    assert report.params == total - 2 * per_layer
    reference = tiny.bert()  # the same weights, with the pruned heads' context zeroed instead
    for layer, name in enumerate(("encoder.L0.attn", "encoder.L1.attn")):
        def drop(_mod, _args, out, heads=report.pruned_heads[name]):
            context = out[0].clone()  # (B, T, heads * head_dim)
            for h in heads:
                context[..., h * 8:(h + 1) * 8] = 0
            return (context, *out[1:])
        reference.bert.encoder.layer[layer].attention.self.register_forward_hook(drop)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reference(**inputs).logits, atol=1e-5)
        assert not torch.allclose(model(**inputs).logits, tiny.bert()(**inputs).logits, atol=1e-5)
    linear = 2 * (4 * 1024 + 2 * 2048) - 2 * (3 * 2 * 8 * 32 + 2 * 8 * 32) + 32 * 32 + 64
    assert report.flops == 2 * 10 * linear + 2 * (2 * 2 * 10 * 10 * 8 * 2)
    assert math.isclose(report.sparsity, 0.5)
