"""Structured pruning of transformer blocks by weight magnitude: a narrower trainable copy of a block
(hidden, attention-inner and FFN widths cut to the units of largest L1 norm), as Ladder Side Tuning
initialises its side network from the backbone (Sung et al., NeurIPS 2022, after Li et al.'s
magnitude pruning). Other plugins' modules attached inside a block are left out of the copy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from petlsearch.plugins.mechanisms.hooks import PETLModule
from petlsearch.plugins.mechanisms.lean_attention import use_lean_attention
from petlsearch.searchspace.roles import block_role, type_name

# (output dimension, input dimension) of each role, in terms of the widths that shrink
# (k and v have fewer heads than q under grouped-query attention: "kv_inner")
ROLE_DIMS: dict[str, tuple[str, str | None]] = {
    "attn.q": ("inner", "hidden"), "attn.k": ("kv_inner", "hidden"), "attn.v": ("kv_inner", "hidden"),
    "attn.o": ("hidden", "inner"), "ffn.up": ("ffn", "hidden"), "ffn.gate": ("ffn", "hidden"),
    "ffn.down": ("hidden", "ffn"), "norm": ("hidden", None),
    "xattn.q": ("inner", "hidden"), "xattn.k": ("kv_inner", "hidden"), "xattn.v": ("kv_inner", "hidden"),
    "xattn.o": ("hidden", "inner"),
}


def _importance(linears: dict[str, list[nn.Module]], norms: list[nn.Module]) -> dict[str, torch.Tensor]:
    """L1 norm of the weights that touch each hidden, attention-inner and FFN unit."""
    score: dict[str, torch.Tensor] = {}

    def add(kind: str, values: torch.Tensor) -> None:
        score[kind] = score.get(kind, 0) + values.detach().float().abs()

    for role, modules in linears.items():
        out_kind, in_kind = ROLE_DIMS[role]
        for m in modules:
            add(out_kind, m.weight.abs().sum(1))
            add(in_kind, m.weight.abs().sum(0))
    for m in norms:
        add("hidden", m.weight)
    return score


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score, k).indices.sort().values


def _keep(score: dict[str, torch.Tensor], widths: dict[str, int], heads: int, kv_heads: int,
          rotary: bool) -> dict[str, torch.Tensor]:
    """Indices kept per dimension; the attention keeps every head, each cut to head_dim / r. With
    as many k / v heads as q heads and no rotary embedding each head keeps its own largest
    dimensions (q, k, v and o of a head agree); otherwise every head keeps one set, so that a q
    head meets its shared k / v head on the same dimensions, and under a rotary embedding that set
    is closed under its pairs (i, i + head_dim / 2), whose cos / sin the side block then reads."""
    inner = score["inner"].view(heads, -1)
    kv = score["kv_inner"].view(kv_heads, -1)
    head_dim, keep = inner.shape[1], widths["head_dim"]
    if kv_heads == heads and not rotary:
        both = inner + kv
        per_head = [h * head_dim + _top(both[h], keep) for h in range(heads)]
        dims = None
        inner_idx = kv_idx = torch.cat(per_head)
    else:
        per_dim = inner.sum(0) + kv.sum(0)
        if rotary:
            half = head_dim // 2
            pairs = _top(per_dim[:half] + per_dim[half:], keep // 2)
            dims = torch.cat([pairs, pairs + half])
        else:
            dims = _top(per_dim, keep)
        inner_idx = torch.cat([h * head_dim + dims for h in range(heads)])
        kv_idx = torch.cat([h * head_dim + dims for h in range(kv_heads)])
    return {"hidden": _top(score["hidden"], widths["hidden"]), "ffn": _top(score["ffn"], widths["ffn"]),
            "inner": inner_idx, "kv_inner": kv_idx, "rope": dims}


def _parts(block: nn.Module, roles: Mapping[str, str] | None = None) -> tuple[dict[str, list[nn.Module]], list[nn.Module]]:
    """A block's linears by role (the roles whose widths shrink) and its norms, not counting
    other plugins' modules attached inside it. `roles` (path inside the block -> role) are the
    model graph's, names or structure; without them the name rules decide."""
    linears: dict[str, list[nn.Module]] = {}
    norms = []
    attached = tuple(name + "." for name, m in block.named_modules() if isinstance(m, PETLModule))
    for name, m in block.named_modules():
        if isinstance(m, PETLModule) or name.startswith(attached):
            continue
        if roles is not None:
            role = roles.get(name)
        else:
            role = block_role(name, type_name(m)) if name else None
        if role == "norm":
            norms.append(m)
        elif role in ROLE_DIMS:
            linears.setdefault(role, []).append(m)
    return linears, norms


def hidden_units(blocks: list[nn.Module], width: int, roles: Sequence[Mapping[str, str] | None] | None = None) -> torch.Tensor:
    """The residual-stream units the side network keeps: one set for all its blocks (a pruned
    network's hidden size is one dimension through every layer, and the ladders hand states from
    block to block), by L1 norm summed over the blocks (`roles`: each block's, as `prune_block`)."""
    roles = roles or [None] * len(blocks)
    return _top(sum(_importance(*_parts(b, r))["hidden"] for b, r in zip(blocks, roles)), width)


def prune_block(block: nn.Module, widths: dict[str, int], hidden: torch.Tensor | None = None,
                rotary: bool = False, roles: Mapping[str, str] | None = None) -> nn.Module:
    """A trainable copy of `block` cut to `widths` by weight magnitude (structured pruning);
    `hidden` fixes which residual-stream units it keeps (default: the block's own largest);
    `roles` maps paths inside the block to the graph's roles (default: the name rules). Under a
    rotary embedding (`rotary`) the copy keeps the head dimensions `petl_rope_dims` (a buffer),
    at which the caller cuts the cos / sin it passes."""
    side = copy.deepcopy(block)
    _strip(side)
    use_lean_attention(side)  # a side copy runs the lean attention, on its own config copy: the backbone keeps its own
    linears, norms = _parts(side, roles)
    q, k = linears["attn.q"][0], linears["attn.k"][0]
    old = {"hidden": q.in_features, "inner": q.out_features, "kv_inner": k.out_features}
    head_dim = _head_dim(side, old["inner"])
    heads, kv_heads = old["inner"] // head_dim, old["kv_inner"] // head_dim
    keep = _keep(_importance(linears, norms), widths, heads, kv_heads, rotary)
    if hidden is not None:
        keep["hidden"] = hidden
    for role, modules in linears.items():
        out_kind, in_kind = ROLE_DIMS[role]
        for m in modules:
            _slice(m, keep[out_kind], keep[in_kind])
    for m in norms:
        _slice(m, keep["hidden"], None)
    _fix_sizes(side, old, widths, heads)
    if rotary:
        side.register_buffer("petl_rope_dims", keep["rope"], persistent=False)
    for p in side.parameters():
        p.requires_grad_(True)
    return side


def prune_norm(norm: nn.Module, hidden: torch.Tensor) -> nn.Module:
    """A trainable copy of a final norm cut to the side network's `hidden` units."""
    side = copy.deepcopy(norm)
    _strip(side)
    _slice(side, hidden, None)
    for p in side.parameters():
        p.requires_grad_(True)
    return side


def _head_dim(block: nn.Module, inner: int) -> int:
    for m in block.modules():
        for attr in ("attention_head_size", "head_dim", "key_value_proj_dim"):
            value = getattr(m, attr, None)
            if isinstance(value, int) and value > 0 and inner % value == 0:
                return value
    raise ValueError(f"lst: cannot find the head size of {type(block).__name__}")


def _slice(m: nn.Module, out_idx: torch.Tensor, in_idx: torch.Tensor | None) -> None:
    with torch.no_grad():
        w = m.weight[out_idx] if in_idx is None else m.weight[out_idx][:, in_idx]
        m.weight = nn.Parameter(w.clone())
        if getattr(m, "bias", None) is not None:
            m.bias = nn.Parameter(m.bias[out_idx].clone())
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = int(out_idx.numel()), int(in_idx.numel())
    if isinstance(m, nn.LayerNorm):
        m.normalized_shape = (int(out_idx.numel()),)


def _fix_sizes(block: nn.Module, old: dict[str, int], widths: dict[str, int], heads: int) -> None:
    """Size attributes the attention modules read in forward (head size, inner size, scaling)."""
    old_head = old["inner"] // heads
    for m in block.modules():
        for attr in ("attention_head_size", "head_dim", "key_value_proj_dim", "d_kv"):
            if getattr(m, attr, None) == old_head:
                setattr(m, attr, widths["head_dim"])
        for attr in ("all_head_size", "inner_dim"):
            if getattr(m, attr, None) == old["inner"]:
                setattr(m, attr, widths["inner"])
        for attr in ("embed_dim", "d_model", "hidden_size"):
            if getattr(m, attr, None) == old["hidden"]:
                setattr(m, attr, widths["hidden"])
        for attr in ("scaling", "scale"):
            value = getattr(m, attr, None)
            if isinstance(value, float) and math.isclose(value, old_head ** -0.5):
                setattr(m, attr, widths["head_dim"] ** -0.5)


def _strip(block: nn.Module) -> None:
    """Remove other plugins' modules, hooks and parametrizations from a copied block."""
    from torch.nn.utils import parametrize

    for m in list(block.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, PETLModule):
                delattr(m, name)
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        for name in list(getattr(m, "parametrizations", {}) or {}):
            parametrize.remove_parametrizations(m, name, leave_parametrized=False)


# ---------------------------------------------------------------------- the plugin
