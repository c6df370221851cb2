"""VPT: shallow insertion after [CLS], deep replacement, mixed lengths, masks widened mid-stack."""

from __future__ import annotations

import pytest
import torch

from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.vpt import VisualPromptTuning
from petlsearch.searchspace.graph import ModelGraph

PATCHES = 17  # [CLS] + 16 patches of the tiny ViT


def _frozen(family: str):
    model = tiny.FAMILIES[family]()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _attach(model, lengths: dict[int, int]):
    plugin = VisualPromptTuning()
    sites = {s.layer: s for s in plugin.sites(ModelGraph.from_model(model))}
    return {layer: plugin.attach(model, sites[layer], {"length": n}) for layer, n in lengths.items()}


def _block_inputs(model, blocks) -> dict[int, torch.Tensor]:
    """Run the model and return the hidden states each block received (after our hooks)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda _m, a, k, i=i: seen.__setitem__(i, a[0] if a else k["hidden_states"]),
                                           with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(**tiny.inputs("vit"))
    for h in handles:
        h.remove()
    return seen


def test_sites_and_count() -> None:
    plugin = VisualPromptTuning()
    names = {}
    for family in tiny.FAMILIES:
        with torch.device("meta"):
            model = tiny.FAMILIES[family]()
        names[family] = [s.name for s in plugin.sites(ModelGraph.from_model(model))]
    assert names == {"bert": ["encoder.L0", "encoder.L1"], "gpt2": [], "t5": [], "llama": [],
                     "vit": ["vision.L0", "vision.L1"], "clip": ["vision.L0", "vision.L1"]}
    with torch.device("meta"):
        site = plugin.sites(ModelGraph.from_model(tiny.vit()))[0]
    assert plugin.count(site, plugin.config(site, {"length": 7})) == 7 * 32
    assert site.get("patch_fan_in") == 3 * 4 * 4


def test_shallow_inserts_after_cls() -> None:
    model = _frozen("vit")
    (m0,) = _attach(model, {0: 3}).values()
    seen = _block_inputs(model, model.vit.layers)
    assert seen[0].shape[1] == seen[1].shape[1] == PATCHES + 3
    assert torch.equal(seen[0][:, 1:4], m0.prompt.expand(2, -1, -1))
    with torch.no_grad():
        out = model.vit(tiny.inputs("vit")["pixel_values"])
    assert out.last_hidden_state.shape[1] == PATCHES  # the caller's sequence length


def test_deep_replaces_previous_prompt_outputs() -> None:
    model = _frozen("vit")
    mods = _attach(model, {0: 3, 1: 3})
    seen = _block_inputs(model, model.vit.layers)
    assert seen[1].shape[1] == PATCHES + 3  # replaced, not appended
    assert torch.equal(seen[1][:, 1:4], mods[1].prompt.expand(2, -1, -1))
    mods[1].gate = 0.5  # replaced positions move half-way from the layer-0 outputs to the prompt
    half = _block_inputs(model, model.vit.layers)[1][:, 1:4]
    mods[1].gate = 0.0
    old = _block_inputs(model, model.vit.layers)[1][:, 1:4]
    assert torch.allclose(half, old + 0.5 * (mods[1].prompt - old), atol=1e-6)


@pytest.mark.parametrize("deep", [5, 1])
def test_deeper_layer_with_other_length(deep: int) -> None:
    model = _frozen("vit")
    mods = _attach(model, {0: 2, 1: deep})
    seen = _block_inputs(model, model.vit.layers)
    assert seen[1].shape[1] == PATCHES + max(2, deep)
    assert torch.equal(seen[1][:, 1:1 + deep], mods[1].prompt.expand(2, -1, -1))
    if deep < 2:  # the other position carries the layer-0 output forward
        assert not torch.equal(seen[1][:, 2], mods[0].prompt[1].expand(2, -1))


def test_insertion_at_a_later_layer_only() -> None:
    model = _frozen("vit")
    _attach(model, {1: 4})
    seen = _block_inputs(model, model.vit.layers)
    assert seen[0].shape[1] == PATCHES and seen[1].shape[1] == PATCHES + 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layers", [{0: 3}, {1: 3}, {0: 2, 1: 4}])
def test_padding_still_masked_in_text_encoder(attn: str, layers: dict[int, int]) -> None:
    """BERT: the padded row equals the same row without padding, wherever the tokens go in."""
    model = _frozen("bert")
    model.set_attn_implementation(attn)
    mods = _attach(model, layers)
    inputs = tiny.inputs("bert")
    keep = int(inputs["attention_mask"][0].sum())
    with torch.no_grad():
        padded = model(**inputs).logits[:1]
        single = model(input_ids=inputs["input_ids"][:1, :keep],
                       attention_mask=inputs["attention_mask"][:1, :keep]).logits
        for m in mods.values():
            m.gate = 0.0
        off = model(**inputs).logits[:1]
    assert torch.allclose(padded, single, atol=1e-5)
    assert not torch.allclose(padded, off, atol=1e-5)


def test_clip_vision_tower() -> None:
    model = _frozen("clip")
    base = tiny.output_tensor(model(**tiny.inputs("clip")))
    mods = _attach(model, {0: 2, 1: 2})
    with torch.no_grad():
        out = tiny.output_tensor(model(**tiny.inputs("clip")))
        vision = model.vision_model(tiny.inputs("clip")["pixel_values"])
    assert out.shape == base.shape and not torch.allclose(out, base)
    assert vision.last_hidden_state.shape[1] == PATCHES
    for m in mods.values():
        m.uninstall()
    assert torch.equal(tiny.output_tensor(model(**tiny.inputs("clip"))), base)


def test_with_prompt_tuning_on_one_stack_and_deepcopy() -> None:
    """Input-level and block-level tokens share the stack's coordinator; a deep copy stays wired."""
    import copy

    from petlsearch.plugins.prompt_tuning import PromptTuning

    model = _frozen("bert")
    graph = ModelGraph.from_model(model)
    pt = PromptTuning()
    prompt = pt.attach(model, pt.sites(graph)[0], {"length": 2})
    mods = _attach(model, {1: 3})
    inputs = tiny.inputs("bert")
    keep = int(inputs["attention_mask"][0].sum())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        padded = model(**inputs).logits[:1]
        single = model(input_ids=inputs["input_ids"][:1, :keep]).logits
        twin_out = twin(**inputs).logits[:1]
        twin.bert.encoder.layer[1].petl_vpt.prompt.add_(1.0)  # the copy's own prompt drives the copy
        assert torch.equal(model(**inputs).logits[:1], padded)
        assert not torch.allclose(twin(**inputs).logits[:1], padded)
    assert torch.allclose(padded, single, atol=1e-5) and torch.equal(twin_out, padded)
    prompt.uninstall()
    mods[1].uninstall()
    assert not hasattr(model.bert, "_petl_token_slots") and not model.bert._forward_pre_hooks


def test_layer_tokens_beside_a_relative_position_bias_computed_once() -> None:
    """MPNet's encoder computes its relative position bias once, at the input's length, for every
    layer: tokens inserted at a later layer get bias 0 (no position relative to the text), and the
    padded row still equals the unpadded one."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    model = MPNetForSequenceClassification(MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mods = _attach(model, {1: 3})
    with torch.no_grad():
        mods[1].prompt.normal_(std=3.0)  # trained tokens: a random tiny model barely reads small ones
    inputs = tiny.inputs("bert")
    inputs.pop("token_type_ids", None)
    keep = int(inputs["attention_mask"][0].sum())
    with torch.no_grad():
        padded = model(**inputs).logits[:1]
        single = model(input_ids=inputs["input_ids"][:1, :keep], attention_mask=inputs["attention_mask"][:1, :keep]).logits
        mods[1].gate = 0.0
        off = model(**inputs).logits[:1]
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded, off, atol=1e-5)
