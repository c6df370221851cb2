"""Tiny random models of every family, built from configs: for the conformance kit and fast tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

SEQ = 8


def bert(num_labels: int = 2, layers: int = 2):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def gpt2(layers: int = 2):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def t5(layers: int = 2):
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def llama(layers: int = 2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def vit(num_labels: int = 3, layers: int = 2):
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=layers,
                    num_attention_heads=4, intermediate_size=64, num_labels=num_labels)
    return ViTForImageClassification(cfg).eval()


def clip(layers: int = 2):
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=32),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=layers, num_attention_heads=4),
        projection_dim=16,
    )
    return CLIPModel(cfg).eval()


FAMILIES = {"bert": bert, "gpt2": gpt2, "t5": t5, "llama": llama, "vit": vit, "clip": clip}


def inputs(family: str, batch: int = 2) -> dict:
    """A seeded batch of model inputs for `family`, with padding in text masks."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (batch, SEQ), generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, -2:] = 0
    pixels = torch.randn(batch, 3, 16, 16, generator=g)
    if family in ("bert", "gpt2", "llama"):
        return {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :4]}
    if family == "vit":
        return {"pixel_values": pixels}
    if family == "clip":
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    raise KeyError(family)


def output_tensor(out) -> torch.Tensor:
    """The main output tensor of a model call (logits, or CLIP's image-text logits)."""
    for name in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out[0]
