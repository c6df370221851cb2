"""The memory model against measurement: core, sparse, token, side and query plugins within 15% on
small configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from petlsearch.plugins import create_plugin
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.measure import measure
from petlsearch.searchspace.memory import BatchShape, block_profile, estimate, marginal_cost

B, T = 4, 32


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def small(family: str) -> tuple[nn.Module, dict, BatchShape]:
    """Tiny but not trivial: hidden 64, FFN 256, 4 heads, 2 layers, dropout on where the family has it."""
    torch.manual_seed(0)
    ids = torch.randint(1, 500, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -5:] = 0
    if family == "bert":
        cfg = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, num_labels=3)
        return _frozen(BertForSequenceClassification(cfg)), {"input_ids": ids, "attention_mask": mask}, BatchShape(B, T)
    if family == "t5":
        cfg = T5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4,
                       decoder_start_token_id=0)
        batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids.flip(1)}
        return _frozen(T5ForConditionalGeneration(cfg)), batch, BatchShape(B, T)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, num_labels=5)
    pixels = torch.randn(B, 3, 32, 32)
    return _frozen(ViTForImageClassification(cfg)), {"pixel_values": pixels}, BatchShape(B, 17)


def _attach(model: nn.Module, name: str, pick: str = "all", batch: dict | None = None) -> tuple[ModelGraph, list]:
    graph = ModelGraph.from_model(model)
    plugin = create_plugin(name)
    if plugin.needs_data:  # FISH's Fisher scores, DSEE's sparse support
        labelled = {**batch, "labels": torch.zeros(B, dtype=torch.long)} if "decoder_input_ids" not in batch else batch
        plugin.prepare(model, [labelled])
    sites = plugin.sites(graph)
    if pick == "top":
        top = max(s.layer or 0 for s in sites)
        sites = [s for s in sites if (s.layer or 0) == top]
    placements = []
    for site in sites:
        cfg = plugin.config(site)
        plugin.attach(model, site, cfg)
        placements.append((plugin, site, cfg))
    return graph, placements


CASES = [(f, p, pick) for f in ("bert", "t5", "vit")
         for p in ("lora", "adapter", "parallel_adapter", "bitfit", "ia3", "lst", "vqt")
         for pick in ("all", "top")
         if not (f == "t5" and p in ("bitfit", "vqt")) and not (p == "lst" and pick == "top")
         and not (f == "t5" and pick == "all" and p in ("lora", "adapter", "parallel_adapter"))]  # speed
# weight updates that materialise a dense effective weight, and tokens that lengthen the sequence
CASES += [(f, p, pick) for f, p in (("bert", "fish_mask"), ("bert", "dsee"), ("bert", "kadaptation"),
                                    ("vit", "fish_mask"), ("t5", "kadaptation"), ("bert", "prompt_tuning"),
                                    ("bert", "attempt"), ("bert", "vpt"), ("vit", "vpt"), ("t5", "prompt_tuning"))
          for pick in ("all", "top") if not (p in ("prompt_tuning", "attempt") and pick == "top")]


@pytest.mark.parametrize(("family", "name", "pick"), CASES)
def test_estimate_within_15_percent_of_measured(family: str, name: str, pick: str) -> None:
    model, batch, shape = small(family)
    graph, placements = _attach(model, name, pick, batch)
    measured = measure(model, batch)
    est = estimate(graph, placements, shape)
    assert abs(est.total - measured.total) <= 0.15 * measured.total, (est, measured)
    # the activations alone, so that the frozen weights cannot hide an error
    assert abs(est.activations - measured.activations) <= 0.15 * measured.activations, (est, measured)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.trainable_state == 16 * trained


def test_prompts_at_the_input_and_deep_prompts_lengthen_the_blocks_they_feed() -> None:
    model, batch, shape = small("bert")
    graph = ModelGraph.from_model(model)
    prompt, vpt = create_plugin("prompt_tuning"), create_plugin("vpt")
    placements = [(prompt, prompt.sites(graph)[0], {"length": 8})]
    placements += [(vpt, site, {"length": 4}) for site in vpt.sites(graph) if site.layer == 1]
    for plugin, site, cfg in placements:
        plugin.attach(model, site, plugin.config(site, cfg))
    measured = measure(model, batch)
    est = estimate(graph, [(p, s, p.config(s, c)) for p, s, c in placements], shape)
    assert abs(est.activations - measured.activations) <= 0.05 * measured.activations, (est, measured)


def test_measure_counts_each_storage_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.sin(x * self.w)  # keeps x (for w's gradient) and x * w (sin's input)
            # cos keeps y, the product keeps cos(y); y * y keeps y twice through two views
            return (torch.cos(y) * self.w).sum() + (y.view(2, 16) * y.view(2, 16)).sum()

    measured = measure(Twice(), {"x": torch.randn(4, 8)})
    floats = 4 * 8 * 4  # one (4, 8) fp32 tensor
    assert 4 * floats <= measured.activations < 5 * floats  # x, x * w, y (once), cos(y)
    assert measured.weights == 8 * 4 and measured.gradients == 8 * 4
    assert measured.optimizer_state >= 2 * 8 * 4  # AdamW's two moments (+ its step counter)


def test_estimate_without_placements_is_the_weights() -> None:
    model, _, shape = small("t5")
    graph = ModelGraph.from_model(model)
    est = estimate(graph, [], shape)
    unique = sum(p.numel() for p in model.parameters())  # T5 ties its embeddings: counted once
    assert est.total == est.weights == 4 * unique and est.activations == 0


def test_lower_placements_cost_more_and_marginal_cost_is_additive_per_candidate() -> None:
    model, _, shape = small("bert")
    graph = ModelGraph.from_model(model)
    lora = create_plugin("lora")
    q = {s.layer: s for s in lora.sites(graph) if s.role == "attn.q"}
    cfg = lora.config(q[0])
    low, high = (estimate(graph, [(lora, q[i], cfg)], shape) for i in (0, 1))
    assert low.activations > high.activations
    both = estimate(graph, [(lora, q[0], cfg), (lora, q[1], cfg)], shape)
    costs = [marginal_cost(graph, lora, q[i], cfg, shape) for i in (0, 1)]
    assert costs[0] > costs[1] > 16 * lora.count(q[1], cfg)
    base = estimate(graph, [], shape).total
    logits = both.breakdown["logits"]
    assert base + logits + sum(costs) >= both.total  # an upper bound: the depth is a maximum


def test_block_profile_reads_the_family() -> None:
    bert = block_profile(ModelGraph.from_model(small("bert")[0]), "encoder")
    assert (bert.post_norm, bert.norm_stats, bert.attn_dropout, bert.gated) == (True, 2, True, False)
    t5 = ModelGraph.from_model(small("t5")[0])
    enc, dec = block_profile(t5, "encoder"), block_profile(t5, "decoder")
    assert (enc.norm_stats, enc.ffn_dropout, enc.cross, dec.cross) == (1, True, False, True)
    # attention probabilities grow with seq^2 * heads on the math path (attention dropout on)
    grow = bert.elements(1, 64) - bert.elements(1, 32)
    assert grow == pytest.approx(3 * bert.heads * 32)
