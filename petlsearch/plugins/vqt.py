"""VQT: learnable query tokens per layer, read out for the head (Tu et al., Visual Query Tuning:
Towards Effective Usage of Intermediate Representations for Parameter and Memory Efficient
Transfer Learning, CVPR 2023).

At each chosen layer, n learnable query tokens are appended to the layer's input; an attention
mask lets them attend to the layer's tokens (and to each other) while the original tokens do NOT
attend to them, so the original tokens' outputs, and with them the whole backbone, are unchanged.
The queries' outputs are not fed to the next layer: they are flattened and read out for the head
by a linear map added to the classifier's logits (the paper's linear classifier over the
concatenation [CLS; query outputs], split per layer). The readout starts at zero, so a fresh module
is the identity. The gradient reaches the queries through their own layer only, never the layers
below. When nothing below or inside the block trains, the block runs on its T + n tokens without
autograd and the queries' outputs are recomputed in backward (QueryPass), so training keeps each
query block's input (B, T, h) rather than its activations: that is why VQT is memory-efficient
(with autograd on, the block kept its whole activations at every query layer; docs/benchmarks.md
has the measurement). That direct pass remains for structures that train below or inside a query
block, whose memory the model then underestimates.

Works through hooks on the block (no edit of the model's source) for encoder stacks of models
with a pooled classification head (BERT / RoBERTa, ViT) with eager or SDPA attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import PETLModule
from petlsearch.searchspace.dims import Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, block_sites


def extend_mask(mask: torch.Tensor | None, batch: int, tokens: int, queries: int, dtype: torch.dtype,
                boolean: bool, device: torch.device) -> torch.Tensor:
    """The (B, 1, T+n, T+n) mask: original rows see only original keys (as `mask` allowed), query
    rows see every valid original key and every query. Boolean (True = attend) or additive."""
    total = tokens + queries
    allowed = torch.ones(batch, 1, total, total, dtype=torch.bool, device=device)
    allowed[..., :tokens, tokens:] = False
    if mask is not None:
        orig = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        orig = orig.expand(batch, 1, tokens, tokens)
        allowed[..., :tokens, :tokens] = orig
        allowed[..., tokens:, :tokens] = orig.any(dim=-2, keepdim=True)  # valid (unpadded) keys
    if boolean:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class QueryTokens(PETLModule):
    """n query tokens at one block and their share of the readout (classes x n*h)."""

    lean = True  # False: always keep the block's activations (the direct pass; tests compare the two)

    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        super().__init__(site)
        n, h = cfg["queries"], site.in_features
        self.queries = nn.Parameter(torch.empty(n, h))  # (n, h)
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.readout = nn.Parameter(torch.zeros(site.get("classes"), n * h))  # zero: identity at init
        self._out: torch.Tensor | None = None
        self._call: tuple[tuple, dict, tuple] | None = None  # the block's arguments and random state
        self._tokens = 0
        self._detach = True
        self._grad: list[bool] = []
        self._boolean = True

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise PluginError(f"vqt needs eager or sdpa attention to mask its queries, not {impl!r}; "
                              "load the model with attn_implementation='sdpa'")
        self._boolean = impl == "sdpa"
        head = model.get_submodule(self.site.get("head"))
        self._handles.append(target.register_forward_pre_hook(self._on_input, with_kwargs=True))
        self._handles.append(target.register_forward_hook(self._on_output, always_call=True))
        self._handles.append(head.register_forward_hook(self._on_head))

    def _on_input(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        self._out, self._call, self._tokens = None, None, 0
        if self.gate_off:
            return None
        x = args[0] if args else kwargs["hidden_states"]  # (B, T, h)
        # lean: nothing below or inside the block trains, so the tokens need no gradient and only
        # the queries' outputs do: the block runs without autograd and QueryPass recomputes it
        own = {id(p) for p in self.parameters()}  # this module may be the block's child
        self._detach = not x.requires_grad and not any(p.requires_grad and id(p) not in own
                                                         for p in block.parameters())
        lean = self.lean and self._detach and torch.is_grad_enabled()
        self._grad.append(torch.is_grad_enabled())
        if lean:  # with the random state the block's dropout draws from, for an exact recompute
            cuda = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
            self._call = (args, kwargs, (torch.get_rng_state(), cuda))
            torch.set_grad_enabled(False)
        self._tokens = x.shape[1]
        return _joined(args, kwargs, x, self.queries, self._boolean)

    def _on_output(self, block: nn.Module, _args: tuple, out: Any) -> Any:
        if self._grad:
            torch.set_grad_enabled(self._grad.pop())
        if self.gate_off or not self._tokens or out is None:
            return None
        hidden = out[0] if isinstance(out, tuple) else out  # (B, T + n, h)
        queries_out, kept = hidden[:, self._tokens:], hidden[:, :self._tokens]
        if self._call is not None:
            (args, kwargs, states), self._call = self._call, None

            def recompute(x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
                joined_args, joined_kwargs = _joined(args, kwargs, x, queries, self._boolean)
                joined = block.forward(*joined_args, **joined_kwargs)  # not block(...): no hooks again
                return (joined[0] if isinstance(joined, tuple) else joined)[:, x.shape[1]:]

            x = args[0] if args else kwargs["hidden_states"]
            queries_out = QueryPass.apply(recompute, states, x, self.queries, queries_out)
        else:
            queries_out = queries_out.contiguous()  # a view would keep the whole output alive
            if self._detach:  # the tokens never see the queries: keep autograd off the layers above
                kept = kept.detach()
        self._out, self._tokens = queries_out, 0
        return (kept, *out[1:]) if isinstance(out, tuple) else kept

    def _on_head(self, _mod: nn.Module, _args: tuple, logits: torch.Tensor) -> torch.Tensor | None:
        feats, self._out = self._out, None
        if feats is None or self.gate_off:
            return None
        return logits + self.gated(F.linear(feats.flatten(1), self.readout.to(feats.dtype)))


def _joined(args: tuple, kwargs: dict, x: torch.Tensor, queries: torch.Tensor, boolean: bool) -> tuple[tuple, dict]:
    """The block's arguments with the queries appended to its tokens and the mask extended."""
    batch, tokens = x.shape[0], x.shape[1]
    q = queries.to(x.dtype).expand(batch, -1, -1)  # (B, n, h)
    joined = torch.cat([x, q], dim=1)  # (B, T + n, h)
    in_args = len(args) > 1
    mask = args[1] if in_args else kwargs.get("attention_mask")
    mask = extend_mask(mask, batch, tokens, q.shape[1], x.dtype, boolean, x.device)
    if in_args:
        return (joined, mask, *args[2:]), kwargs
    kwargs = {**kwargs, "attention_mask": mask}
    return ((joined, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": joined})


class QueryPass(torch.autograd.Function):
    """The queries' outputs of a block that ran without autograd, recomputed in backward: autograd
    keeps the block's input (B, T, h) instead of the block's activations on T + n tokens (per
    layer, the difference between VQT's training memory and LoRA's). Backward re-runs the block
    with the forward's random state (dropout) and autocast and returns the queries' gradient. The
    re-run holds one block's activations at a time, during backward only."""

    @staticmethod
    def forward(ctx: Any, recompute: Any, states: tuple, x: torch.Tensor, queries: torch.Tensor,
                computed: torch.Tensor) -> torch.Tensor:
        ctx.recompute, (ctx.cpu_state, ctx.cuda_state) = recompute, states
        ctx.devices = [x.device] if x.device.type == "cuda" else []
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, queries)  # the queries are a parameter: only x is kept
        return computed.contiguous()  # a copy: the slice would keep the block's whole output alive

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, queries = ctx.saved_tensors
        q = queries.detach().requires_grad_(True)
        device_type, enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_state)
            if ctx.cuda_state is not None:
                torch.cuda.set_rng_state(ctx.cuda_state, ctx.devices[0])
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                out = ctx.recompute(x, q)
        (grad_q,) = torch.autograd.grad(out, [q], grad)
        return None, None, None, grad_q, None


def _stack_ok(graph: Any, stack: str) -> bool:
    """Bidirectional encoder stacks without relative or rotary positions (they would see the queries)."""
    if stack not in ("encoder", "vision"):
        return False
    return not any("relative_attention_bias" in n.path or "Rotary" in n.type for n in graph.nodes.values())


class VisualQueryTuning(Plugin):
    name = "vqt"
    description = "Query tokens per layer whose outputs are read out for the head, not fed back"
    paper = ("Tu et al., Visual Query Tuning: Towards Effective Usage of Intermediate Representations "
             "for Parameter and Memory Efficient Transfer Learning, CVPR 2023")
    kinds = ("query",)
    recipe = Recipe(lr=1e-3, source=(
        "1e-3 on MiniLM, 100 steps: 0.732 test accuracy over 3 seeds; seed 0 at 3e-3: 0.742 validation "
        "accuracy, at 1e-3: 0.764 (python -m bench --only zoo, python -m bench --only recipes)"))

    def __init__(self, max_queries: int = 64) -> None:
        self.max_queries = max_queries

    def sites(self, graph: Any) -> list[Site]:
        heads = graph.find(role="head")
        if len(heads) != 1 or not graph.pooled_head:
            return []
        head = heads[0]
        return [s.with_extra(head=head.path, classes=head.out_features)
                for s in block_sites(graph, "query") if _stack_ok(graph, s.stack)]

    def dims(self, site: Site) -> dict[str, Dim]:
        return {"queries": IntDim("queries", default=1, low=1, high=self.max_queries, log=True,
                                  help="query tokens at this layer")}

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        n, h = cfg["queries"], site.in_features
        return n * h + site.get("classes") * n * h

    def build(self, site: Site, cfg: dict[str, Any]) -> QueryTokens:
        return QueryTokens(site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        """The queries' pass keeps the block's input (B, T, h) and the readout the queries' outputs
        (B, n, h); the pass's activations are recomputed in backward (QueryPass)."""
        return shape.batch * (shape.seq + cfg["queries"]) * site.in_features
