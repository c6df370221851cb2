"""MAGMA: sites on causal LMs, exact counts, the image prefix (mask, labels, positions, gate 0),
features from a frozen encoder, and captioning digits: the prefix carries what the image shows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.checks import _perturb
from petlsearch.plugins.context import use
from petlsearch.plugins.magma import Magma
from petlsearch.plugins.parts.bottleneck import bottleneck_count
from petlsearch.plugins.testing import applicable_families, check_plugin
from petlsearch.searchspace.graph import ModelGraph

IMAGE_DIM = 16


def _lm():
    model = tiny.gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ModelGraph.from_model(model)


def _attach_all(plugin: Magma, model, graph, bottleneck: int = 4):
    return [plugin.attach(model, s, {} if s.kind == "tokens" else {"bottleneck": bottleneck})
            for s in plugin.sites(graph)]


def test_sites_only_on_causal_lms():
    plugin = Magma(image_dim=IMAGE_DIM)
    assert applicable_families(plugin) == ["gpt2", "llama"]
    _, graph = _lm()
    assert [s.key for s in plugin.sites(graph)] == [
        "decoder.image_prefix:tokens", "decoder.L0.ffn:sequential", "decoder.L1.ffn:sequential"]
    both = Magma(sublayers=("attn", "ffn")).sites(graph)
    assert len(both) == 5


def test_counts_by_formula():
    plugin = Magma(image_dim=IMAGE_DIM)
    model, graph = _lm()
    mods = _attach_all(plugin, model, graph, bottleneck=4)
    prefix, adapter = plugin.sites(graph)[:2]
    assert plugin.count(prefix, {}) == IMAGE_DIM * 32 + 32 + 2 * 32
    assert plugin.count(adapter, {"bottleneck": 4}) == bottleneck_count(32, 4, 32)
    assert plugin.dims(adapter)["bottleneck"].default == 8  # MAGMA: hidden / 4
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        plugin.count(prefix, {}) + 2 * bottleneck_count(32, 4, 32)
    assert [m.trainable_count() for m in mods] == [plugin.count(prefix, {})] + 2 * [bottleneck_count(32, 4, 32)]


def test_prefix_extends_logits_mask_and_labels():
    plugin = Magma(image_dim=IMAGE_DIM)
    model, graph = _lm()
    _attach_all(plugin, model, graph)
    inputs = tiny.inputs("gpt2")  # (2, 8), the last two tokens of row 0 are padding
    feats = torch.randn(2, 3, IMAGE_DIM)
    with torch.no_grad(), use(image_features=feats):
        out = model(**inputs, labels=inputs["input_ids"])
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][0, -2:] = 7  # padded positions: masked, so the other positions ignore them
        out2 = model(**changed)
    assert out.logits.shape == (2, 3 + 8, 100)
    assert torch.allclose(out.logits[0, :9], out2.logits[0, :9], atol=1e-6)
    # labels are -100 under the prefix: the loss is the text's own next-token loss
    text = out.logits[:, 3:]
    expected = F.cross_entropy(text[:, :-1].reshape(-1, 100), inputs["input_ids"][:, 1:].reshape(-1))
    first = F.cross_entropy(out.logits[:, 2], inputs["input_ids"][:, 0])  # last prefix slot -> first token
    assert torch.allclose(out.loss, (expected * 14 + first * 2) / 16, atol=1e-5)


def test_no_features_or_gate_zero_is_the_plain_lm():
    plugin = Magma(image_dim=IMAGE_DIM)
    model, graph = _lm()
    inputs = tiny.inputs("gpt2")
    with torch.no_grad():
        base = model(**inputs).logits
    mods = _attach_all(plugin, model, graph)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, base, atol=1e-6)  # adapters start at identity
        for m in mods:
            _perturb(m)
        assert not torch.allclose(model(**inputs).logits, base, atol=1e-4)  # adapters only, no prefix
        for gate in (0.0, torch.tensor(0.0)):
            for m in mods:
                m.gate = gate
            with use(image_features=torch.randn(2, 3, IMAGE_DIM)):
                assert torch.allclose(model(**inputs).logits, base, atol=1e-6)


def test_features_from_a_frozen_encoder_and_shapes():
    encoder = tiny.vit().vit  # (B, 17, 32) tokens
    plugin = Magma(image_dim=32, encoder=encoder)
    model, graph = _lm()
    prefix = plugin.attach(model, plugin.sites(graph)[0])
    ids = tiny.inputs("gpt2")["input_ids"]
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        with use(pixel_values=pixels):
            from_pixels = model(ids).logits  # input_ids given positionally
        with use(image_features=encoder(pixels).last_hidden_state):
            from_features = model(input_ids=ids).logits
        with use(image_features=torch.randn(2, 32)):  # pooled (B, F): one prefix token
            assert model(input_ids=ids).logits.shape == (2, 9, 100)
    assert from_pixels.shape == (2, 17 + 8, 100) and torch.allclose(from_pixels, from_features)
    assert prefix.trainable_count() == 32 * 32 + 96  # the encoder runs under no_grad, outside the model
    assert "petl_magma.proj.weight" in dict(model.named_parameters())
    assert not any("encoder" in k for k in prefix.state_dict())  # the encoder is not saved with the prefix
    with use(image_features=torch.randn(2, 3, 7)), pytest.raises(PluginError, match="image_dim=7"):
        model(input_ids=ids)
    with use(image_features=torch.randn(3, 2, 32)), pytest.raises(PluginError, match="3 images"):
        model(input_ids=ids)


def test_conformance_with_the_prefix_active():
    with use(image_features=torch.randn(2, 3, IMAGE_DIM)):
        assert check_plugin(Magma(image_dim=IMAGE_DIM), families=("gpt2",)).families == ["gpt2"]


# ---------------------------------------------------------------------- captioning digits
VOCAB = {"this": 1, "is": 2, "a": 3}  # the digit d is token 4 + d


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images[:n], dtype=torch.float32)[:, None].expand(-1, 3, -1, -1) / 16
    caption = torch.tensor([VOCAB["this"], VOCAB["is"], VOCAB["a"]])
    ids = torch.cat([caption.expand(n, 3), torch.tensor(d.target[:n])[:, None] + 4], dim=1)  # "this is a 3"
    return images.contiguous(), ids


def _caption_lm():
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    # a vocabulary of 16 and a wider init, so that a frozen random LM can express confident tokens
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                    initializer_range=0.2, bos_token_id=0, eos_token_id=0))
    encoder = ViTModel(ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)
    for p in [*lm.parameters(), *encoder.parameters()]:
        p.requires_grad_(False)
    return lm, encoder.eval()


def _train_captions(with_images: bool, steps: int = 50) -> tuple[list[float], float]:
    images, ids = _digits(128)
    lm, encoder = _caption_lm()
    plugin = Magma(image_dim=32, encoder=encoder, sublayers=("attn", "ffn"), dropout=0.0)
    for site in plugin.sites(ModelGraph.from_model(lm)):
        plugin.attach(lm, site, {} if site.kind == "tokens" else {"bottleneck": 16})
    lm.train()
    opt = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=3e-2)
    losses, digit = [], []
    for _ in range(steps):
        with use(**({"pixel_values": images} if with_images else {})):
            out = lm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        digit.append(F.cross_entropy(out.logits[:, -2], ids[:, -1]).item())  # the digit token after "a"
    return losses, min(digit[-5:])


def test_training_on_digit_captions_reads_the_image():
    losses, digit = _train_captions(with_images=True)
    assert losses[-1] < 0.5 * losses[0]
    _, ids = _digits(128)
    p = torch.bincount(ids[:, -1] - 4, minlength=10).float() / len(ids)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()  # the best a model blind to the image can do
    assert digit < entropy - 0.3
    _, blind = _train_captions(with_images=False, steps=10)
    assert blind >= entropy - 1e-3


def test_cached_generation_gives_the_logits_of_uncached_generation():
    """Decoding steps after the first find the prefix in the KV cache: their positions and mask move past it."""
    plugin = Magma(image_dim=IMAGE_DIM)
    model, graph = _lm()
    for m in _attach_all(plugin, model, graph):
        _perturb(m)
    model.eval()
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding

    def step_logits(cache: bool) -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=cache,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(out.logits)

    with torch.no_grad():
        text_only = step_logits(True)
        with use(image_features=torch.randn(2, 3, IMAGE_DIM)):
            cached, uncached = step_logits(True), step_logits(False)
    assert torch.allclose(cached, uncached, atol=1e-5)
    assert not torch.allclose(cached[1:], text_only[1:], atol=1e-4)  # the image steers the later steps too
