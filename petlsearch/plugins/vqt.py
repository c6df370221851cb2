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
below. Each chosen block still runs on T + n tokens with autograd on, so it keeps the whole block's
activations: on ViT-B/16 at batch 16 x 197, VQT at every layer needs 74% of LoRA's training memory
(bench memory). A query path that kept only each layer's input, or the tokens' keys and values,
would be leaner; it is not built yet.

Works through hooks on the block (no edit of the model's source) for encoder stacks of models
with a pooled classification head (BERT / RoBERTa, ViT) with eager or SDPA attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import BatchShape, PETLModule, Plugin, Site
from petlsearch.plugins.dims import Dim, IntDim
from petlsearch.searchspace.sites import block_sites

_POOLED = ("ForSequenceClassification", "ForImageClassification")


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

    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        super().__init__(site)
        n, h = cfg["queries"], site.in_features
        self.queries = nn.Parameter(torch.empty(n, h))  # (n, h)
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.readout = nn.Parameter(torch.zeros(site.get("classes"), n * h))  # zero: identity at init
        self._tokens = 0
        self._out: torch.Tensor | None = None
        self._boolean = True
        self._detach = True

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise PluginError(f"vqt needs eager or sdpa attention to mask its queries, not {impl!r}; "
                              "load the model with attn_implementation='sdpa'")
        self._boolean = impl == "sdpa"
        head = model.get_submodule(self.site.get("head"))
        self._handles.append(target.register_forward_pre_hook(self._on_input, with_kwargs=True))
        self._handles.append(target.register_forward_hook(self._on_output))
        self._handles.append(head.register_forward_hook(self._on_head))

    def _on_input(self, _mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        self._out = None
        if self.gate_off:
            return None
        x = args[0] if args else kwargs["hidden_states"]  # (B, T, h)
        batch, self._tokens = x.shape[0], x.shape[1]
        self._detach = not x.requires_grad
        q = self.queries.to(x.dtype).expand(batch, -1, -1)  # (B, n, h)
        x = torch.cat([x, q], dim=1)  # (B, T + n, h)
        in_args = len(args) > 1
        mask = args[1] if in_args else kwargs.get("attention_mask")
        mask = extend_mask(mask, batch, self._tokens, q.shape[1], x.dtype, self._boolean, x.device)
        if in_args:
            return (x, mask, *args[2:]), kwargs
        kwargs = {**kwargs, "attention_mask": mask}
        return ((x, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": x})

    def _on_output(self, _mod: nn.Module, _args: tuple, out: Any) -> Any:
        if self.gate_off or not self._tokens:
            return None
        hidden = out[0] if isinstance(out, tuple) else out  # (B, T + n, h)
        self._out = hidden[:, self._tokens:]  # (B, n, h): not fed back
        kept = hidden[:, :self._tokens]
        if self._detach:  # the original tokens never see the queries: keep autograd off the layers above
            kept = kept.detach()
        self._tokens = 0
        return (kept, *out[1:]) if isinstance(out, tuple) else kept

    def _on_head(self, _mod: nn.Module, _args: tuple, logits: torch.Tensor) -> torch.Tensor | None:
        feats, self._out = self._out, None
        if feats is None or self.gate_off:
            return None
        return logits + self.gated(F.linear(feats.flatten(1), self.readout.to(feats.dtype)))


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

    def __init__(self, max_queries: int = 64) -> None:
        self.max_queries = max_queries

    def sites(self, graph: Any) -> list[Site]:
        from petlsearch.searchspace.memory import block_profile

        heads = graph.find(role="head")
        if len(heads) != 1 or not graph.info.get("model_type", "").endswith(_POOLED):
            return []
        head = heads[0]
        return [s.with_extra(head=head.path, classes=head.out_features, profile=block_profile(graph, s.stack))
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
        """The block runs on T + n tokens that now need a gradient (the whole block's activations;
        the fused attention path also keeps the mask), and the readout keeps the query outputs, a
        view that holds the block's whole output (B, T + n, h) alive."""
        n, profile = cfg["queries"], site.get("profile")
        seq = shape.seq + n
        block = profile.elements(shape.batch * seq, seq)
        mask = 0 if profile.attn_dropout else shape.batch * seq * seq
        return int(block + mask + shape.batch * seq * site.in_features)
