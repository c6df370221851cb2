"""Memory-lean attention for side networks (LST): what backward keeps does not grow with seq^2 x heads.

Eager attention keeps, per layer, the softmax output, the dropout mask (fp32 on CPU) and the dropped
probabilities: three (batch, heads, seq, seq) tensors, which dominate a side network's memory since
width reduction does not shrink them. `LeanAttention` keeps q, k, v, each row's log-sum-exp and a
1-byte dropout mask, and recomputes the probabilities in backward (as flash attention does; the
extra matmul is at the side network's small head size). It is a transformers attention function
(`AttentionInterface`), selected per copied block through its config, so the backbone is untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NAME = "petlsearch_lean"


def _scores(q: torch.Tensor, k: torch.Tensor, scaling: float, bias: torch.Tensor | None,
            mask: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return scores


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the dimensions a tensor of `shape` was broadcast along."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class LeanAttention(torch.autograd.Function):
    """out = dropout(softmax(q k^T * scaling + bias + mask)) v; backward recomputes the probabilities
    from q, k and the saved log-sum-exp. `bias` (T5's position bias) may need a gradient, `mask`
    (additive float or boolean keep-mask) not. Backward recomputes under the forward's autocast
    state (bf16 on a GPU) and returns each gradient in its input's dtype."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                mask: torch.Tensor | None, scaling: float, p: float) -> torch.Tensor:
        scores = _scores(q, k, scaling, bias, mask)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
        keep = torch.rand_like(probs) >= p if p > 0 else None
        if keep is not None:
            probs = probs * keep / (1 - p)
        ctx.scaling, ctx.p = scaling, p
        device = q.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(q, k, v, bias, mask, lse, keep)
        return torch.matmul(probs, v)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, bias, mask, lse, keep = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            probs = torch.exp(_scores(q, k, ctx.scaling, bias, mask) - lse)
            dropped = probs if keep is None else probs * keep / (1 - ctx.p)
            grad_v = torch.matmul(dropped.transpose(-1, -2), grad)
            grad_probs = torch.matmul(grad, v.transpose(-1, -2))
            if keep is not None:
                grad_probs = grad_probs * keep / (1 - ctx.p)
            grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
            grad_q = torch.matmul(grad_scores, k) * ctx.scaling
            grad_k = torch.matmul(grad_scores.transpose(-1, -2), q) * ctx.scaling
            grad_bias = _reduce_to(grad_scores, ctx.bias_shape).to(bias.dtype) if ctx.needs_input_grad[3] else None
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_bias, None, None, None


def lean_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           position_bias: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The transformers attention-function signature (as eager_attention_forward): q, k, v are
    (batch, heads, seq, head_dim); returns (batch, seq, heads, head_dim) and no probabilities."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if key.shape[1] != query.shape[1]:  # grouped-query attention: share each k / v head
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if attention_mask is None and kwargs.get("is_causal", getattr(module, "is_causal", False)) and query.shape[2] > 1:
        n, m = query.shape[2], key.shape[2]
        attention_mask = torch.ones(n, m, dtype=torch.bool, device=query.device).tril(m - n)
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[2]]
    p = dropout if module.training else 0.0
    out = LeanAttention.apply(query, key, value, position_bias, attention_mask, scaling, p)
    return out.transpose(1, 2).contiguous(), None


def use_lean_attention(block: nn.Module) -> bool:
    """Make the transformers attention modules of `block` (a copy: it must not share its config with
    the backbone) run `lean_attention_forward`; False when none reads a config."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, lean_attention_forward)
    configs = {id(c): c for m in block.modules()
               if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")}
    for config in configs.values():
        config._attn_implementation = NAME
    return bool(configs)
