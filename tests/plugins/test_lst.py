"""Ladder Side-Tuning: exact counts, pruned initialisation, ladders and gates, and the memory it saves."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins import create_plugin
from petlsearch.plugins.lst import TEMPERATURE, LadderSideTuning, kept_layers, side_widths
from petlsearch.plugins.parts.pruning import prune_block
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.measure import measure

log = logging.getLogger(__name__)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_sites_per_stack() -> None:
    plugin = LadderSideTuning()
    for family, names in (("bert", ["encoder"]), ("t5", ["encoder+decoder"]), ("vit", ["vision"]),
                          ("clip", ["text", "vision"]), ("gpt2", []), ("llama", ["decoder"])):  # GPT-2: a fused qkv
        graph = ModelGraph.from_model(tiny.FAMILIES[family]())
        assert [s.name for s in plugin.sites(graph)] == names, family


def test_kept_layers_always_keep_the_last() -> None:
    assert kept_layers(6, 1) == [0, 1, 2, 3, 4, 5]
    assert kept_layers(6, 2) == [1, 3, 5]
    assert kept_layers(5, 3) == [1, 4]
    assert kept_layers(4, 4) == [3]


@pytest.mark.parametrize("keep_every", [1, 2])
def test_count_by_formula_on_bert(keep_every: int) -> None:
    model = _frozen(tiny.bert(layers=4))  # hidden 32, 4 heads (head_dim 8), FFN 64
    plugin = LadderSideTuning()
    site = plugin.sites(ModelGraph.from_model(model))[0]
    cfg = {"reduction": 4, "keep_every": keep_every}
    h, hs, inner, ffn = 32, 8, 4 * 2, 16
    # q, k, v (h_s -> inner_s), o (inner_s -> h_s), up, down, two LayerNorms: weights and biases
    block = 3 * (hs * inner + inner) + (inner * hs + hs) + (hs * ffn + ffn) + (ffn * hs + hs) + 2 * 2 * hs
    kept = len(kept_layers(4, keep_every))
    expected = kept * block + (kept + 1) * (h * hs + hs) + kept + (hs * h + h)
    assert plugin.count(site, cfg) == expected
    module = plugin.attach(model, site, cfg)
    assert module.trainable_count() == expected and len(module.blocks) == kept


def test_pruning_keeps_the_largest_weights() -> None:
    model = tiny.bert()
    block = model.bert.encoder.layer[0]
    site = LadderSideTuning().sites(ModelGraph.from_model(model))[0]
    widths = side_widths(site, 2)
    side = prune_block(block, widths)
    w, ws = block.intermediate.dense.weight, side.intermediate.dense.weight  # (64, 32) -> (32, 16)
    assert ws.shape == (widths["ffn"], widths["hidden"])
    # every kept FFN unit is among the largest by L1 norm of its up-row and down-column
    score = w.abs().sum(1) + block.output.dense.weight.abs().sum(0)
    rows = [int((w == r).all(1).nonzero()[0]) for r in _rows_of(w, ws)]
    assert set(rows) == set(torch.topk(score, widths["ffn"]).indices.tolist())
    assert all(p.requires_grad for p in side.parameters())
    assert block.intermediate.dense.weight.shape == (64, 32)  # the backbone is untouched
    x = torch.randn(2, 5, widths["hidden"])
    assert side(x).shape == x.shape  # runs at the side width


def test_side_blocks_share_one_set_of_hidden_units_and_ladders_start_as_its_selection() -> None:
    model = _frozen(tiny.bert(layers=3))
    layers = model.bert.encoder.layer
    with torch.no_grad():  # distinct gains, so that a kept gain names the unit it was cut from
        for layer in layers:
            layer.output.LayerNorm.weight.copy_(torch.rand(32) + 0.5)
    plugin = LadderSideTuning()
    module = plugin.attach(model, plugin.sites(ModelGraph.from_model(model))[0], {"reduction": 4, "keep_every": 1})
    units = [[int(torch.nonzero(ln.weight == w)[0]) for w in side_ln.weight]  # which backbone units each kept
             for layer, side in zip(layers, module.blocks)
             for ln, side_ln in ((layer.output.LayerNorm, side.output.LayerNorm),)]
    assert units[0] == units[1] == units[2] and len(set(units[0])) == 8  # one set of 32 / 4 units
    x = torch.randn(2, 5, 32)
    for down in (module.halves[0].down_first, *module.downs):
        assert torch.equal(down(x), x[..., units[0]])  # the backbone's state, cut to those units


def _rows_of(w: torch.Tensor, ws: torch.Tensor) -> list[torch.Tensor]:
    """The original rows (full width) that the pruned rows were cut from."""
    out = []
    for r in ws:
        match = [row for row in w if torch.isin(r, row).all()]
        out.append(match[0])
    return out


def test_ladder_gates_and_no_gradient_into_the_backbone() -> None:
    model = _frozen(tiny.bert())
    plugin = LadderSideTuning()
    module = plugin.attach(model, plugin.sites(ModelGraph.from_model(model))[0], {"reduction": 2, "keep_every": 1})
    assert torch.allclose(torch.sigmoid(module.alphas / TEMPERATURE), torch.full((2,), 0.5))
    torch.nn.init.normal_(module.up.weight)
    inputs = tiny.inputs("bert")
    saved_in_backbone = []
    hooks = [b.register_forward_pre_hook(lambda *_: saved_in_backbone.append(torch.is_grad_enabled()))
             for b in model.bert.encoder.layer]
    model.train()
    out = model(**inputs).logits
    out.sum().backward()
    assert saved_in_backbone == [False, False]  # both blocks ran without gradient
    assert module.alphas.grad is not None and module.alphas.grad.abs().sum() > 0
    assert module.downs[0].weight.grad.abs().sum() > 0 and module.blocks[0].attention.self.query.weight.grad is not None
    for h in hooks:
        h.remove()
    with torch.no_grad():  # the gates move the output: gate 0 on every ladder keeps only the side's own path
        module.alphas.fill_(10.0)
        a = model(**inputs).logits
        module.alphas.fill_(-10.0)
        b = model(**inputs).logits
    assert not torch.allclose(a, b)


def _t5_like() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    return _frozen(T5ForConditionalGeneration(cfg))


def _t5_batch(target: int = 2) -> dict[str, torch.Tensor]:
    """GLUE as text-to-text: long inputs, a short target."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 300, (8, 64), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, :target].contiguous()}


def test_t5_side_decoder_reads_the_side_encoder_and_no_backbone_block_keeps_a_graph() -> None:
    model = _t5_like()
    plugin = LadderSideTuning()
    site = plugin.sites(ModelGraph.from_model(model))[0]
    cfg = {"reduction": 4, "keep_every": 1}
    batch = _t5_batch(8)
    model.eval()
    before = model(**batch).logits
    module = plugin.attach(model, site, cfg)
    assert [len(h.blocks) for h in module.halves] == [2, 2]
    assert module.trainable_count() == plugin.count(site, cfg)
    assert torch.equal(model(**batch).logits, before)  # the up-projection starts at zero
    torch.nn.init.normal_(module.up.weight)
    grad_modes = []
    blocks = [*model.encoder.block, *model.decoder.block]
    hooks = [b.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled())) for b in blocks]
    model.train()
    model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    assert grad_modes == [False] * 4  # neither stack of the backbone keeps anything for backward
    encoder_half = module.halves[0]
    # the side encoder learns only through the side decoder's cross-attention
    assert encoder_half.blocks[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    assert encoder_half.norm.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder.parameters() if not p.requires_grad)


def test_t5_generation_needs_no_cache() -> None:
    model = _t5_like()
    plugin = LadderSideTuning()
    plugin.attach(model, plugin.sites(ModelGraph.from_model(model))[0], {"reduction": 4, "keep_every": 2})
    ids = _t5_batch()["input_ids"][:2]
    assert model.generate(ids, max_new_tokens=3, use_cache=False).shape == (2, 4)
    with pytest.raises(PluginError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=3)


def test_training_memory_well_below_lora_and_full_finetuning_on_t5() -> None:
    """Measured on this config (CPU, target of two tokens): LST's activations are 0.57 of LoRA's on
    q and v, its total 0.63 of LoRA's; the side blocks keep every head's attention probabilities, which do not
    shrink with r."""
    batch = _t5_batch()

    full_model = _t5_like()
    for p in full_model.parameters():
        p.requires_grad_(True)
    full = measure(full_model, batch)

    lora_model, lora = _t5_like(), create_plugin("lora")
    for site in lora.sites(ModelGraph.from_model(lora_model)):
        if site.role in ("attn.q", "attn.v"):
            lora.attach(lora_model, site, {"rank": 8})
    lora_mem = measure(lora_model, batch)

    lst_model, lst = _t5_like(), create_plugin("lst")
    lst.attach(lst_model, lst.sites(ModelGraph.from_model(lst_model))[0], {"reduction": 8, "keep_every": 1})
    lst_mem = measure(lst_model, batch)

    log.info("activations: full %d, lora %d, lst %d; totals: full %d, lora %d, lst %d", full.activations,
             lora_mem.activations, lst_mem.activations, full.total, lora_mem.total, lst_mem.total)
    assert lst_mem.activations < 0.65 * lora_mem.activations < full.activations
    assert lst_mem.total < 0.7 * lora_mem.total < full.total
    assert lst_mem.total < 0.4 * full.total


def _gqa_llama() -> torch.nn.Module:
    """A tiny Llama with grouped-query attention (4 q heads, 2 k / v heads of 16) and RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_a_pruned_rotary_block_keeps_pairs_and_rotates_as_its_backbone_block() -> None:
    """Under RoPE the side block keeps one set of head dimensions closed under the rotation's pairs
    (i, i + d/2) for every q and k / v head; rotating the pruned q with the cos / sin cut to those
    dimensions gives the backbone's rotated q cut to them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _gqa_llama()
    site = LadderSideTuning().sites(ModelGraph.from_model(model))[0]
    assert site.get("rotary") and site.get("causal") and (site.get("inner"), site.get("kv_inner")) == (64, 32)
    widths = side_widths(site, 4)
    assert widths == {"hidden": 16, "ffn": 32, "inner": 16, "kv_inner": 8, "head_dim": 4}
    side = prune_block(model.model.layers[0], widths, rotary=True)
    dims = side.petl_rope_dims
    assert len(dims) == 4 and set((dims[:2] + 8).tolist()) == set(dims[2:].tolist())  # pairs of a 16-wide head
    attn = side.self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (16, 8, 8)
    assert attn.head_dim == 4 and attn.o_proj.in_features == 16
    q = torch.randn(1, 4, 5, 16)
    cos, sin = model.model.rotary_emb(q, torch.arange(5)[None])
    full, _ = apply_rotary_pos_emb(q, q, cos, sin)
    cut, _ = apply_rotary_pos_emb(q[..., dims], q[..., dims], cos[..., dims], sin[..., dims])
    torch.testing.assert_close(cut, full[..., dims])


def test_lst_trains_beside_a_gqa_rotary_decoder_and_refuses_cached_decoding() -> None:
    model = _gqa_llama()
    plugin = LadderSideTuning()
    site = plugin.sites(ModelGraph.from_model(model))[0]
    ids = torch.randint(0, 100, (2, 7))
    base = model(input_ids=ids).logits
    side = plugin.attach(model, site, {"reduction": 4, "keep_every": 1})
    torch.testing.assert_close(model(input_ids=ids).logits, base)  # the up-projection starts at zero
    assert plugin.count(site, {"reduction": 4, "keep_every": 1}) == side.trainable_count()
    torch.nn.init.normal_(side.up.weight, std=0.1)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in side.parameters())
    assert all(p.grad is None for p in model.model.parameters() if not p.requires_grad)
    # causal: the side network at position t reads nothing after t
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 100
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=changed).logits[:, :-1], model(input_ids=ids).logits[:, :-1])
    assert model.generate(ids[:1], max_new_tokens=3, use_cache=False, do_sample=False).shape == (1, 10)
    with pytest.raises(PluginError, match="use_cache=False"):
        model.generate(ids[:1], max_new_tokens=3, do_sample=False)


def test_the_side_network_prunes_by_the_graphs_roles_also_when_they_come_from_structure() -> None:
    """DeBERTa-v2 names q, k, v `query_proj`, `key_proj`, `value_proj`, which no name rule knows:
    the graph finds them from structure, and LST's pruning reads the graph's roles."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    model = _frozen(DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)).eval())
    graph = ModelGraph.from_model(model)
    assert graph.node("deberta.encoder.layer.0.attention.self.query_proj").role_from == "structure"
    plugin = LadderSideTuning()
    site = plugin.sites(graph)[0]
    side = plugin.attach(model, site, {"reduction": 4, "keep_every": 1})
    assert side.blocks[0].attention.self.query_proj.out_features == side_widths(site, 4)["inner"]
    assert plugin.count(site, {"reduction": 4, "keep_every": 1}) == side.trainable_count()
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None for p in side.parameters())
