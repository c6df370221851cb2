"""Prompt tuning: parity with Hugging Face peft, mask / token-type extension, padding, decoders."""

from __future__ import annotations

import copy

import pytest
import torch

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.prompt_tuning import PromptTuning
from petlsearch.searchspace.graph import ModelGraph


def _frozen(family: str):
    model = tiny.FAMILIES[family]()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _attach(model, length: int = 5, init: str = "random"):
    plugin = PromptTuning()
    site = plugin.sites(ModelGraph.from_model(model))[0]
    return plugin, site, plugin.attach(model, site, {"length": length, "init": init})


def _bert_inputs() -> dict:
    inputs = tiny.inputs("bert")
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    inputs["token_type_ids"][:, 4:] = 1
    return inputs


def test_sites_one_per_text_stack() -> None:
    plugin = PromptTuning()
    for family, expected in {"bert": ["encoder.input"], "gpt2": ["decoder.input"], "t5": ["encoder.input"],
                             "llama": ["decoder.input"], "vit": [], "clip": []}.items():
        with torch.device("meta"):
            model = tiny.FAMILIES[family]()
        assert [s.name for s in plugin.sites(ModelGraph.from_model(model))] == expected, family


def test_matches_peft_prompt_tuning_on_bert() -> None:
    from peft import PromptTuningConfig, get_peft_model

    model = _frozen("bert")
    reference = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))
    plugin, site, module = _attach(model, length=5)
    embedding = reference.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(module.prompt)
    inputs = _bert_inputs()
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, reference(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    count = plugin.count(site, {"length": 5, "init": "random"})
    assert count == module.trainable_count() == embedding.numel() == 5 * 32


def test_mask_and_token_types_extended() -> None:
    model = _frozen("bert")
    _, _, module = _attach(model, length=3)
    seen = {}
    model.bert.register_forward_pre_hook(lambda _m, a, k: seen.update(k, args=a), with_kwargs=True)  # after ours
    inputs = _bert_inputs()
    with torch.no_grad():
        model(**inputs)
    mask, types, embeds = seen["attention_mask"], seen["token_type_ids"], seen["inputs_embeds"]
    assert mask.shape == types.shape == (2, 3 + tiny.SEQ) and embeds.shape == (2, 3 + tiny.SEQ, 32)
    assert mask[:, :3].eq(1).all() and torch.equal(mask[:, 3:], inputs["attention_mask"])
    assert types[:, :3].eq(0).all() and torch.equal(types[:, 3:], inputs["token_type_ids"])
    assert torch.equal(embeds[:, :3], module.prompt.expand(2, -1, -1))
    assert seen["args"][0] is None  # input_ids, passed by position, replaced by inputs_embeds


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_padding_still_masked(family: str) -> None:
    """A padded row gives the same outputs as the same row without its padding."""
    model = _frozen(family)
    _attach(model, length=4)
    inputs = tiny.inputs(family)
    keep = int(inputs["attention_mask"][0].sum())
    alone = {k: v[:1, :keep] if k in ("input_ids", "attention_mask") else v[:1] for k, v in inputs.items()}
    with torch.no_grad():
        padded, single = model(**inputs).logits[:1], model(**alone).logits
    if family in ("gpt2", "llama"):  # per-token logits: compare the unpadded positions
        padded = padded[:, :keep]
    assert torch.allclose(padded, single, atol=1e-5)


def test_caller_sees_its_sequence_length() -> None:
    model = _frozen("gpt2")
    _attach(model, length=6)
    with torch.no_grad():
        out = model(**tiny.inputs("gpt2"), output_hidden_states=True)
    assert out.logits.shape[:2] == (2, tiny.SEQ)
    assert all(h.shape[1] == tiny.SEQ for h in out.hidden_states)


def test_t5_decoder_attends_to_prompts() -> None:
    model = _frozen("t5")
    _, _, module = _attach(model, length=4)
    inputs = tiny.inputs("t5")
    with torch.no_grad():
        out = model(**inputs)
        module.prompt.add_(1.0)
        moved = model(**inputs)
    assert out.encoder_last_hidden_state.shape[1] == 4 + tiny.SEQ  # kept for cross-attention
    assert not torch.allclose(out.logits, moved.logits)


def test_vocab_init_samples_embedding_rows() -> None:
    model = _frozen("bert")
    _, _, module = _attach(model, length=7, init="vocab")
    table = model.bert.embeddings.word_embeddings.weight
    assert all((table == row).all(dim=1).any() for row in module.prompt)


def test_length_bounded_by_position_table() -> None:
    plugin = PromptTuning()
    with torch.device("meta"):
        site = plugin.sites(ModelGraph.from_model(tiny.bert()))[0]
    assert plugin.dims(site)["length"].high == 32  # half of the 64 positions
    with pytest.raises(PluginError):
        plugin.config(site, {"length": 40})


def test_kv_cache_decoding_is_refused() -> None:
    model = _frozen("gpt2")
    _attach(model, length=2)
    ids = tiny.inputs("gpt2")["input_ids"]
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).cache
        with pytest.raises(PluginError, match="KV cache"):
            model(input_ids=ids[:, -1:], cache=past, use_cache=True)


def test_uninstall_removes_hooks() -> None:
    model = _frozen("bert")
    _, _, module = _attach(model)
    module.uninstall()
    assert not hasattr(model.bert, "_petl_token_slots")
    assert not model.bert._forward_pre_hooks and not model.bert._forward_hooks
