"""Lean attention (LST side blocks): the same outputs and gradients as eager attention, less memory."""

from __future__ import annotations

import copy

import pytest
import torch

from petlsearch.plugins.mechanisms.lean_attention import LeanAttention, use_lean_attention


def _eager(q, k, v, bias, mask, scaling, keep, p):
    scores = q @ k.transpose(-1, -2) * scaling
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1)
    if keep is not None:
        probs = probs * keep / (1 - p)
    return probs @ v


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_outputs_and_gradients_equal_eager_attention(mask_kind: str, p: float):
    torch.manual_seed(0)
    b, h, s, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, h, s, s, requires_grad=True)  # T5's position bias: trainable, shared by the batch
    mask = {"none": None, "bool": torch.rand(b, 1, s, s) > 0.3,
            "float": torch.where(torch.rand(b, 1, s, s) > 0.3, 0.0, -1e9)}[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # no fully masked row
    torch.manual_seed(7)
    out = LeanAttention.apply(q, k, v, bias, mask, 0.5, p)
    torch.manual_seed(7)  # the same dropout draw
    keep = torch.rand(b, h, s, s) >= p if p > 0 else None
    ref = _eager(q, k, v, bias, mask, 0.5, keep, p)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), g)
    refs = torch.autograd.grad(ref, (q, k, v, bias), g)
    for got, want in zip(grads, refs):
        assert torch.allclose(got, want, atol=1e-5)


def test_backward_under_bf16_autocast_with_fp32_queries():
    """As on a rotary decoder under the trainer's autocast: q, k come out of RoPE in fp32, v out of a
    bf16 Linear; backward recomputes in the forward's autocast state and returns each gradient in its
    input's dtype, close to the fp32 gradients (it raised 'expected scalar type Float')."""
    torch.manual_seed(0)
    q, k = (torch.randn(2, 2, 6, 8, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 2, 6, 8).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LeanAttention.apply(q, k, v, None, None, 8 ** -0.5, 0.0)
    out.float().sum().backward()
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    _eager(q2, k2, v2, None, None, 8 ** -0.5, None, 0.0).sum().backward()
    for got, ref in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert torch.allclose(got.float(), ref, atol=0.1, rtol=0.05)


def test_backward_keeps_no_seq_squared_float_tensor():
    b, h, s, d = 2, 4, 64, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        LeanAttention.apply(q, k, v, None, None, 0.35, 0.1)
    square = [t for t in kept if t is not None and t.shape[-2:] == (s, s)]
    assert square and all(t.dtype == torch.bool for t in square)  # only the dropout mask


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_a_side_copy_runs_lean_attention_with_the_blocks_outputs(family: str):
    from petlsearch.plugins import _tiny as tiny

    model = tiny.bert() if family == "bert" else tiny.t5()
    model.eval()
    block = model.bert.encoder.layer[0] if family == "bert" else model.encoder.block[0]
    side = copy.deepcopy(block)
    assert use_lean_attention(side)
    x = torch.randn(2, 6, model.config.hidden_size if family == "bert" else model.config.d_model)
    with torch.no_grad():
        expected, got = block(x)[0], side(x)[0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert block.attention.self.config._attn_implementation != "petlsearch_lean" if family == "bert" else \
        block.layer[0].SelfAttention.config._attn_implementation != "petlsearch_lean"
