"""The kv_prefix mechanism: extra keys and values in attention, through transformers' AttentionInterface.

Prefix tuning (Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021),
MAM's prefix and HyperPrompt prepend P learned vectors to the keys and values of an attention, so that
every query also attends to them: softmax(q [P_k; K]^T * scale + [0; mask]) [P_v; V].

How, without editing any model source: one function, `prefix_attention`, is registered with
transformers' `AttentionInterface` (and a mask function with `AttentionMaskInterface`) under
`petl_kv_prefix:<base>` for each implementation it can wrap (sdpa, eager). Installing a `KVPrefix`
switches the `_attn_implementation` of the attention module's config to that name; the function then
finds the KVPrefix children of the calling module, concatenates their keys / values in front, extends
the attention mask (and T5's relative position bias, with zeros: prefix keys have no position) for the
prefix positions, and calls the base implementation. The name carries the base, so the mask function
and deep copies know what to delegate to without side state. Uninstalling the last prefix of a config
restores its implementation. Flash / flex attention take masks in other formats and are refused.

Gate g: the prefix logits get + log g, so the prefix's share of the attention, He et al.'s lambda =
g Z_p / (g Z_p + Z_x), is scaled smoothly and differentiably; at g = 0 (float or 0-dim tensor) the
prefix is skipped outright, which is exactly the original attention.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.mechanisms.hooks import PETLModule
from petlsearch.searchspace.roles import dispatches_attention
from petlsearch.searchspace.sites import Site

log = logging.getLogger(__name__)

IMPL = "petl_kv_prefix"
BASES = ("sdpa", "eager")
_registered = False


def impl_name(base: str) -> str:
    return f"{IMPL}:{base}"


def base_of(name: str | None) -> str | None:
    """The implementation `name` wraps ('sdpa' for 'petl_kv_prefix:sdpa'), or `name` itself."""
    if name and name.startswith(IMPL + ":"):
        return name.split(":", 1)[1]
    return name


class KVPrefix(PETLModule):
    """A module that prepends keys and values to the attention at `site.path`.

    Subclasses implement `prefix()`: keys and values shaped (kv_heads, P, head_dim), or with a
    leading batch dimension (B or 1), in the layout of the attention's own keys after its projections
    (and rotary embeddings, which prefix keys do not get).
    """

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self._configs: list[Any] = []  # plain lists: neither the model nor its config become children
        self._roots: list[nn.Module] = []

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        config = attention_config(target, self.site)
        enable(config)
        self._configs.append(config)
        self._roots.append(model)

    def uninstall(self) -> None:
        configs, roots = list(self._configs), list(self._roots)
        super().uninstall()
        self._configs.clear()
        self._roots.clear()
        for config, root in zip(configs, roots):
            if not any(isinstance(m, KVPrefix) and any(c is config for c in m._configs) for m in root.modules()):
                disable(config)


# ---------------------------------------------------------------------- switching a config
def attention_config(target: nn.Module, site: Site) -> Any:
    """The config whose `_attn_implementation` the attention module `target` dispatches on."""
    config = getattr(target, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise PluginError(f"kv_prefix site '{site.key}': {type(target).__name__} has no transformers config; "
                          "prefixes need an attention that dispatches through transformers' AttentionInterface")
    if not dispatches_attention(type(target)):
        raise PluginError(f"kv_prefix site '{site.key}': {type(target).__name__}.forward does not call "
                          "ALL_ATTENTION_FUNCTIONS, so a prefix cannot be added without editing its source")
    return config


def enable(config: Any) -> None:
    current = config._attn_implementation
    if base_of(current) != current:
        return  # already switched by another prefix
    base = current or "eager"
    if base not in BASES:
        raise PluginError(f"kv_prefix works with the attention implementations {list(BASES)}, the model uses "
                          f"'{base}'; load it with attn_implementation='sdpa' (or 'eager')")
    register()
    _set(config, impl_name(base))


def disable(config: Any) -> None:
    current = config._attn_implementation
    if base_of(current) != current:
        _set(config, base_of(current))


def _set(config: Any, name: str) -> None:
    # the internal field changes this config only; the public setter would recurse into sub-configs
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = name
    else:
        config._attn_implementation = name


def register() -> None:
    """Register `prefix_attention` and its mask function under every `petl_kv_prefix:<base>`."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for base in BASES:
        AttentionInterface.register(impl_name(base), prefix_attention)
        AttentionMaskInterface.register(impl_name(base), prefix_mask)
    _registered = True


def prefix_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """Masks are made as the base implementation makes them; prefix columns are added per layer."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if config is None:
        raise PluginError("petl_kv_prefix mask function called without the model config")
    return ALL_MASK_ATTENTION_FUNCTIONS[base_of(config._attn_implementation)](*args, config=config, **kwargs)


# ---------------------------------------------------------------------- the attention function
def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """query (B, heads, T, hd), key / value (B, kv_heads, S, hd): prepend the active prefixes of
    `module`, extend the mask, and call the base implementation."""
    base = base_of(module.config._attn_implementation)
    prefixes = [m for m in module.children() if isinstance(m, KVPrefix) and not m.gate_off]
    if prefixes:
        key, value, attention_mask, kwargs = _with_prefixes(module, prefixes, base, query, key, value,
                                                            attention_mask, kwargs)
    return base_function(base, module)(module, query, key, value, attention_mask, **kwargs)


def base_function(base: str, module: nn.Module) -> Callable:
    if base == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    # eager is model-specific (T5 adds its position bias, GPT-2 casts): the module's own file defines it
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise PluginError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}; "
                          "use attn_implementation='sdpa'")
    return fn


def _with_prefixes(module: nn.Module, prefixes: list[KVPrefix], base: str, query: torch.Tensor,
                   key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    batch, q_len, s_len = query.shape[0], query.shape[2], key.shape[2]
    keys, values, widths, biases = [], [], [], []
    for m in prefixes:
        pk, pv = m.prefix()
        pk, pv = _batched(pk, batch, key), _batched(pv, batch, value)  # (B, kv_heads, P, hd)
        if pk.shape[1] != key.shape[1] or pk.shape[3] != key.shape[3] or pv.shape[1:3] != pk.shape[1:3]:
            raise PluginError(f"kv_prefix '{m.site.key}': prefix keys {tuple(pk.shape[1:])} do not match the "
                              f"attention's keys (kv_heads={key.shape[1]}, head_dim={key.shape[3]})")
        keys.append(pk)
        values.append(pv)
        widths.append(pk.shape[2])
        biases.append(_log_gate(m))
    key = torch.cat([*keys, key], dim=2)  # (B, kv_heads, P + S, hd)
    value = torch.cat([*values, value], dim=2)
    flag = kwargs.get("is_causal")
    flag = getattr(module, "is_causal", True) if flag is None else flag
    # sdpa reads a missing mask as "causal" for decoders (top-left aligned); eager as "no mask"
    causal = mask is None and base == "sdpa" and q_len > 1 and bool(flag)
    mask = extend_mask(mask, widths, biases, causal, q_len, s_len, query.dtype, query.device)
    bias = kwargs.get("position_bias")
    if bias is not None:  # T5: (1 or B, heads, T, S) relative position bias, none for prefix keys
        kwargs = {**kwargs, "position_bias": F.pad(bias, (sum(widths), 0))}
    return key, value, mask, kwargs


def _batched(p: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    p = p.to(dtype=like.dtype, device=like.device)
    if p.dim() == 3:
        p = p.unsqueeze(0)
    return p.expand(batch, -1, -1, -1) if p.shape[0] == 1 and batch != 1 else p


def _log_gate(m: KVPrefix) -> float | torch.Tensor | None:
    g = m.gate
    if isinstance(g, torch.Tensor):
        return torch.log(g)
    if g == 1.0:
        return None
    if g < 0:
        raise PluginError(f"kv_prefix '{m.site.key}': gate {g} < 0; a prefix gate scales attention weights")
    return math.log(g)


def extend_mask(mask: torch.Tensor | None, widths: list[int], biases: list[Any], causal: bool, q_len: int,
                s_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A 4-D mask (.., T, S) extended to (.., T, sum(widths) + S): prefix columns visible to every
    query (True, or 0 + log gate when additive). A missing mask becomes an explicit one where needed."""
    additive = any(b is not None for b in biases)
    if mask is None:
        if causal:
            mask = torch.arange(q_len, device=device)[:, None] >= torch.arange(s_len, device=device)[None, :]
            mask = mask.view(1, 1, q_len, s_len)
        elif not additive:
            return None  # nothing is masked: the prefix is visible as well
        else:
            mask = torch.zeros(1, 1, q_len, s_len, dtype=dtype, device=device)
    if mask.dtype == torch.bool and additive:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    lead = mask.shape[:-1]
    cols = []
    for width, bias in zip(widths, biases):
        if mask.dtype == torch.bool:
            cols.append(mask.new_ones(*lead, width))
        else:
            col = mask.new_zeros(*lead, width)
            cols.append(col if bias is None else col + bias)
    return torch.cat([*cols, mask], dim=-1)
