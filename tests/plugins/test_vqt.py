"""Visual Query Tuning: exact counts, original tokens untouched, the readout, and no gradient below."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins import create_plugin
from petlsearch.plugins.vqt import VisualQueryTuning, extend_mask
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.measure import measure


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _block_outputs(model: torch.nn.Module, blocks: list, inputs: dict) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return outs


def test_sites_only_for_pooled_classifiers() -> None:
    plugin = VisualQueryTuning()
    for family, n in (("bert", 2), ("vit", 2), ("t5", 0), ("gpt2", 0), ("llama", 0), ("clip", 0)):
        sites = plugin.sites(ModelGraph.from_model(tiny.FAMILIES[family]()))
        assert len(sites) == n, family
        assert all(s.kind == "query" for s in sites)


def test_count_by_formula() -> None:
    model = _frozen(tiny.vit(num_labels=3))  # hidden 32
    plugin = VisualQueryTuning()
    site = plugin.sites(ModelGraph.from_model(model))[1]
    assert plugin.count(site, {"queries": 5}) == 5 * 32 + 3 * 5 * 32
    assert plugin.attach(model, site, {"queries": 5}).trainable_count() == 5 * 32 + 3 * 5 * 32


@pytest.mark.parametrize("family", ["bert", "vit"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_original_tokens_unchanged_and_queries_read_out(family: str, impl: str) -> None:
    model = _frozen(tiny.FAMILIES[family]())
    model.config._attn_implementation = impl
    blocks = list(model.bert.encoder.layer if family == "bert" else model.vit.layers)
    inputs = tiny.inputs(family)  # BERT's has padding
    before = _block_outputs(model, blocks, inputs)
    with torch.no_grad():
        original = model(**inputs).logits
    plugin = VisualQueryTuning()
    modules = [plugin.attach(model, s, {"queries": 3}) for s in plugin.sites(ModelGraph.from_model(model))]
    for m in modules:
        torch.nn.init.normal_(m.readout)
    after = _block_outputs(model, blocks, inputs)
    for a, b in zip(after, before):  # same shapes: the queries are not fed back
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():
        read_out = model(**inputs).logits
    # the whole change is the readout of the queries, added to the logits
    assert torch.allclose(_run_without(model, modules, inputs), original, atol=1e-6)
    assert not torch.allclose(read_out, original, atol=1e-3)


def _run_without(model: torch.nn.Module, modules: list, inputs: dict) -> torch.Tensor:
    gates = [m.gate for m in modules]
    for m in modules:
        m.gate = 0.0
    with torch.no_grad():
        out = model(**inputs).logits
    for m, g in zip(modules, gates):
        m.gate = g
    return out


def test_queries_attend_to_the_tokens_but_not_the_reverse() -> None:
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0, ..., 3] = False  # a padded key
    full = extend_mask(mask, 2, 4, 2, torch.float32, True, torch.device("cpu"))
    assert full.shape == (2, 1, 6, 6)
    assert not full[..., :4, 4:].any()  # original tokens never see the queries
    assert full[..., 4:, 4:].all()  # queries see each other
    assert not full[0, 0, 4:, 3].any() and full[1, 0, 4:, 3].all()  # and the valid keys only
    additive = extend_mask(None, 1, 3, 1, torch.float32, False, torch.device("cpu"))
    assert additive[0, 0, 0, 3] == torch.finfo(torch.float32).min and additive[0, 0, 3, 0] == 0


def test_gradient_reaches_queries_but_not_the_layers_below() -> None:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, num_labels=2)
    ids = torch.randint(1, 200, (4, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    vqt_model, vqt = _frozen(BertForSequenceClassification(cfg)), create_plugin("vqt")
    site = vqt.sites(ModelGraph.from_model(vqt_model))[-1]  # the top layer only
    module = vqt.attach(vqt_model, site, {"queries": 4})
    vqt_mem = measure(vqt_model, batch)

    torch.manual_seed(0)
    lora_model, lora = _frozen(BertForSequenceClassification(cfg)), create_plugin("lora")
    bottom = [s for s in lora.sites(ModelGraph.from_model(lora_model)) if s.layer == 0 and s.role == "attn.q"]
    lora.attach(lora_model, bottom[0], {"rank": 1})
    lora_mem = measure(lora_model, batch)
    # VQT keeps its one (extended) layer; LoRA at the bottom keeps every layer above it
    assert vqt_mem.activations < 0.5 * lora_mem.activations

    vqt_model.train()
    torch.nn.init.normal_(module.readout)
    vqt_model(**batch).logits.sum().backward()
    assert module.queries.grad is not None and module.queries.grad.abs().sum() > 0


@pytest.mark.parametrize("with_lora", [False, True])
def test_recomputed_query_pass_gives_the_gradients_of_the_direct_one(monkeypatch, with_lora: bool) -> None:
    """The lean pass (the block without autograd, recomputed in backward with the forward's
    dropout) gives every gradient the direct pass (the block on tokens + queries with autograd)
    gives; with a LoRA inside the query block and below it both take the direct pass."""
    from petlsearch.plugins.vqt import QueryTokens

    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    ids = torch.randint(1, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1])}

    def grads(lean: bool) -> tuple[dict[str, torch.Tensor], int]:
        monkeypatch.setattr(QueryTokens, "lean", lean)
        torch.manual_seed(0)
        model = _frozen(BertForSequenceClassification(cfg)).train()
        graph = ModelGraph.from_model(model)
        if with_lora:
            lora = create_plugin("lora")
            for s in lora.sites(graph):
                if s.role == "attn.v":  # in the query block and below it
                    torch.nn.init.normal_(lora.attach(model, s, {"rank": 2}).lora_B)
        vqt = create_plugin("vqt")
        module = vqt.attach(model, vqt.sites(graph)[-1], {"queries": 2})
        torch.nn.init.normal_(module.readout)
        torch.manual_seed(1)
        loss = model(**batch).loss
        kept = loss.grad_fn is not None and _count_query_passes(loss)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, kept

    (lean, lean_passes), (direct, direct_passes) = grads(True), grads(False)
    assert direct_passes == 0 and lean_passes == (0 if with_lora else 1)
    assert set(lean) == set(direct) and any("queries" in n for n in direct)
    assert sum("lora" in n for n in direct) == (4 if with_lora else 0)  # A and B of both LoRAs
    for name in direct:
        torch.testing.assert_close(lean[name], direct[name], rtol=1e-5, atol=1e-6)


def _count_query_passes(loss: torch.Tensor) -> int:
    seen, stack, n = set(), [loss.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        n += type(fn).__name__ == "QueryPassBackward"
        stack.extend(f for f, _ in fn.next_functions)
    return n
