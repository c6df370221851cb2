"""Role rules: a backbone-independent name for what each module does.

`encoder.L3.attn.q` must name the same place in BERT and RoBERTa, so roles come from rules on the
module's path inside its block and on its type, not from model-specific code. The rules below cover
BERT/RoBERTa/MiniLM, GPT-2, T5, Llama, ViT, CLIP and CNNs (EfficientNet) and the names most other
families use; where they know no name for a block's Linear layer, `structural.py` gives its role
from the block's shapes and order.
"""

from __future__ import annotations

import functools
import re

ROLES = (
    "embed", "attn", "attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv",
    "xattn", "xattn.q", "xattn.k", "xattn.v", "xattn.o",
    "ffn", "ffn.up", "ffn.gate", "ffn.down", "norm", "block", "head", "pool", "conv",
)

# Leaf names of projections, first match wins. Keys are role suffixes under an attention container.
_ATTN_LEAVES = {
    "q": {"q", "query", "q_proj", "q_lin", "to_q", "wq"},
    "k": {"k", "key", "k_proj", "k_lin", "to_k", "wk"},
    "v": {"v", "value", "v_proj", "v_lin", "to_v", "wv"},
    "qkv": {"c_attn", "qkv", "query_key_value", "wqkv", "in_proj", "qkv_proj"},
    "o": {"o", "o_proj", "out_proj", "c_proj", "dense", "out_lin", "proj", "to_out", "wo"},
}
_FFN_LEAVES = {
    "gate": {"gate_proj", "wi_0", "w1", "gate"},
    "up": {"fc1", "c_fc", "up_proj", "wi", "wi_1", "lin1", "dense_h_to_4h", "fc_in", "w3", "up"},
    "down": {"fc2", "c_proj", "down_proj", "wo", "lin2", "dense_4h_to_h", "fc_out", "w2", "down"},
}
_HEAD_NAMES = {"classifier", "lm_head", "score", "qa_outputs", "_fc", "fc", "head", "heads", "cls"}
_CROSS = re.compile(r"cross|encdec|enc_dec|encoder_attn", re.IGNORECASE)
_ATTN = re.compile(r"att", re.IGNORECASE)

LINEAR_TYPES = {"Linear", "Conv1D", "NonDynamicallyQuantizableLinear"}
CONV_TYPES = {"Conv2d", "Conv1d", "Conv3d", "Conv2dStaticSamePadding", "Conv2dDynamicSamePadding"}


def type_name(module: object) -> str:
    """The module's class name; a subclass of nn.Linear that keeps its layout (Falcon's FalconLinear)
    is a 'Linear', so that every rule for Linear layers applies to it."""
    name = type(module).__name__
    if name not in LINEAR_TYPES and name not in CONV_TYPES:
        from torch import nn

        if isinstance(module, nn.Linear):
            return "Linear"
    return name


def family_of(model: object) -> str:
    """The model family: its config's model_type, else a wrapper's `petlsearch_family` attribute
    (a wrapper around a CNN names what it wraps), else its class name, lower case."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type:
        return model_type
    declared = getattr(model, "petlsearch_family", None)
    if isinstance(declared, str) and declared:
        return declared
    return type(model).__name__.lower()


def stack_of(list_path: str, family: str) -> str:
    """Which sequence stack a block list belongs to: encoder, decoder, vision or text."""
    low = list_path.lower()
    if "vision" in low or "visual" in low:
        return "vision"
    if "text" in low:
        return "text"
    if "decoder" in low:
        return "decoder"
    if family in {"vit", "deit", "beit", "swin", "dinov2"} or "efficientnet" in family or "resnet" in family:
        return "vision"
    if family in {"gpt2", "llama", "mistral", "gpt_neox", "opt", "gptj", "qwen2", "phi", "falcon", "gemma"}:
        return "decoder"
    return "decoder" if _decoder_only(family) else "encoder"


@functools.cache
def _decoder_only(family: str) -> bool:
    """A family transformers knows as a causal LM and not as a masked LM (Phi-3, OLMo, Gemma 3):
    its blocks are a decoder stack whatever its modules are called."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return False
    return family in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and family not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES


def block_role(rel_path: str, type_name: str) -> str | None:
    """The role of a module at `rel_path` inside a block (e.g. 'attention.self.query'), or None."""
    parts = rel_path.split(".")
    leaf = parts[-1].lower()
    containers = parts[:-1]
    if type_name in LINEAR_TYPES:
        attn = next((p for p in containers if _ATTN.search(p)), None)
        if attn is not None:
            prefix = "xattn" if _CROSS.search(attn) else "attn"
            for suffix, leaves in _ATTN_LEAVES.items():
                if leaf in leaves:
                    return f"{prefix}.{suffix}"
            return None
        if rel_path.endswith("intermediate.dense"):
            return "ffn.up"
        if rel_path.endswith("output.dense"):
            return "ffn.down"
        for suffix, leaves in _FFN_LEAVES.items():
            if leaf in leaves:
                return f"ffn.{suffix}"
        return None
    if type_name in CONV_TYPES:
        return "conv"
    if "Norm" in type_name:
        return "norm"
    return None


def outer_role(path: str, type_name: str) -> str | None:
    """The role of a module outside the repeated blocks (embeddings, head, pooler, stem convs)."""
    parts = path.split(".")
    if "Embedding" in type_name and "Rotary" not in type_name:
        return "embed"
    if type_name in LINEAR_TYPES and any(p in _HEAD_NAMES for p in parts):  # also per-task heads below one
        return "head"
    if type_name in LINEAR_TYPES and "pooler" in path:
        return "pool"
    if type_name in CONV_TYPES:
        return "conv"
    if "Norm" in type_name:
        return "norm"
    return None


@functools.cache
def dispatches_attention(cls: type) -> bool:
    """Whether an attention module class computes attention through transformers' AttentionInterface
    (its forward calls ALL_ATTENTION_FUNCTIONS): only those can take extra keys and values (kv_prefix)
    without an edit of the model's source. True when the source cannot be read (compiled, REPL)."""
    import inspect

    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True
