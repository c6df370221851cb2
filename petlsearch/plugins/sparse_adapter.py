"""SparseAdapter: bottleneck adapters pruned at initialisation (He et al., "SparseAdapter: An Easy
Approach for Improving the Parameter-Efficiency of Adapters", Findings of EMNLP 2022).

A Houlsby adapter's down (d x b) and up (b x d) weights are pruned before training by a pruner:
'random', 'magnitude' or 'snip' (|w * dL/dw| on task data: `prepare(model, batches)` first). Each
matrix keeps exactly round((1 - sparsity) n) entries (top-k by score), so the count is exact:
kept(d b) + b + kept(b d) + d. Masks are persistent buffers and the forward uses weight * mask,
so pruned entries get zero gradients. "Large-Sparse" (a wider adapter at the same budget through
a higher sparsity) is a point of the (bottleneck, sparsity) dims: see `large_sparse`.

Scores are taken on the adapter as randomly initialised (nn.Linear's init for both matrices);
then the up weights are set to zero, so the fresh adapter is the identity. SNIP needs the gradient
of the loss at the adapter's output: `prepare` records, for every site, a token sample of the
sublayer's output H and of dL/dH (`petlsearch.scoring.output_taps`), which gives SNIP of an adapter
of any width at gate -> 0 without building it during prepare.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.mechanisms.hooks import SequentialDelta
from petlsearch.plugins.parts.bottleneck import Bottleneck, BottleneckPlugin
from petlsearch.searchspace.dims import Dim, FloatDim, IntDim
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site

if TYPE_CHECKING:
    from collections.abc import Iterable

PRUNERS = ("random", "magnitude", "snip")


def kept(numel: int, sparsity: float) -> int:
    """Entries a pruned matrix of `numel` entries keeps (at least one)."""
    return max(1, int(round((1.0 - sparsity) * numel)))


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().topk(k).indices] = True
    return mask.view_as(scores)


class SparseBottleneck(Bottleneck):
    """Bottleneck whose weights are multiplied by fixed 0/1 masks (buffers) in the forward."""

    def __init__(self, fin: int, bottleneck: int, fout: int, activation: str,
                 down_mask: torch.Tensor, up_mask: torch.Tensor) -> None:
        super().__init__(fin, bottleneck, fout, activation)
        self.register_buffer("down_mask", down_mask)  # (b, fin) bool
        self.register_buffer("up_mask", up_mask)  # (fout, b) bool

    def zero_pruned(self) -> None:
        """Set the pruned entries themselves to zero (they never reach the forward anyway)."""
        with torch.no_grad():
            self.down.weight.mul_(self.down_mask)
            self.up.weight.mul_(self.up_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(F.linear(x, self.down.weight * self.down_mask, self.down.bias))
        return F.linear(h, self.up.weight * self.up_mask, self.up.bias)


class SparseSequentialAdapter(SequentialDelta):
    def __init__(self, site: Site, adapter: SparseBottleneck) -> None:
        super().__init__(site)
        self.adapter = adapter

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter(h)

    def trainable_count(self) -> int:
        a = self.adapter
        return (int(a.down_mask.sum()) + int(a.up_mask.sum())
                + a.down.bias.numel() + a.up.bias.numel())


class SparseAdapter(BottleneckPlugin):
    name = "sparse_adapter"
    description = "Bottleneck adapter pruned at initialisation (random, magnitude or SNIP)"
    paper = "He et al., SparseAdapter: An Easy Approach for Improving the Parameter-Efficiency of Adapters, Findings of EMNLP 2022"
    kinds = ("sequential",)
    recipe = Recipe(lr=3e-3, source=(
        "swept 1e-3..3e-2 on MiniLM, 100 steps, seed 0: 3e-3 best (0.740 validation accuracy; 1e-3: 0.617) "
        "(python -m bench --only recipes)"))
    needs_data = True  # for the default pruner, SNIP; the others need no prepare

    def __init__(self, sublayers: tuple[str, ...] = ("attn", "xattn", "ffn"), max_bottleneck: int = 512,
                 pruner: str = "snip", max_tokens: int = 1024) -> None:
        if pruner not in PRUNERS:
            raise PluginError(f"plugin 'sparse_adapter': pruner {pruner!r} is not one of {list(PRUNERS)}")
        super().__init__(sublayers, max_bottleneck)
        self.pruner = pruner
        self.max_tokens = max_tokens

    def dims(self, site: Site) -> dict[str, Dim]:
        dims = super().dims(site)
        high = max(1, min(self.max_bottleneck, 2 * site.out_features))  # Large-Sparse: wider than d
        dims["bottleneck"] = IntDim("bottleneck", default=min(16, high), low=1, high=high, log=True,
                                    help="width of the down-projection (before pruning)")
        dims["sparsity"] = FloatDim("sparsity", default=0.5, low=0.0, high=0.95,
                                    help="fraction of each weight matrix pruned at initialisation")
        return dims

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        d, b, s = site.out_features, cfg["bottleneck"], cfg["sparsity"]
        return kept(d * b, s) + b + kept(b * d, s) + d

    def prepare(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """SNIP only: record H and dL/dH at every site's output (a token sample per site)."""
        if self.pruner != "snip":
            return
        from petlsearch.scoring import output_taps
        from petlsearch.searchspace.graph import ModelGraph

        paths = sorted({s.path for s in self.sites(ModelGraph.from_model(model))})
        self._taps = output_taps(model, batches, paths, max_tokens=self.max_tokens)

    def build(self, site: Site, cfg: dict[str, Any]) -> SparseSequentialAdapter:
        d, b, s = site.out_features, cfg["bottleneck"], cfg["sparsity"]
        dense = Bottleneck(d, b, d, cfg["activation"])
        up_ref = torch.empty(d, b)  # the up weights as nn.Linear would draw them: scored, then zeroed
        nn.init.kaiming_uniform_(up_ref, a=math.sqrt(5))
        down_score, up_score = self.scores(site, dense, up_ref, cfg["activation"])
        adapter = SparseBottleneck(d, b, d, cfg["activation"], top_mask(down_score, kept(d * b, s)),
                                   top_mask(up_score, kept(b * d, s)))
        adapter.load_state_dict(dense.state_dict(), strict=False)  # the init that was scored, up = 0
        adapter.zero_pruned()
        return SparseSequentialAdapter(site, adapter)

    def scores(self, site: Site, dense: Bottleneck, up_ref: torch.Tensor,
               activation: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pruner scores of the down (b, d) and up (d, b) weights."""
        down = dense.down.weight.detach()
        if self.pruner == "random":
            return torch.rand(down.shape), torch.rand(up_ref.shape)
        if self.pruner == "magnitude":
            return down.abs(), up_ref.abs()
        taps = getattr(self, "_taps", {}).get(site.path)
        if taps is None:
            raise PluginError(f"plugin 'sparse_adapter' (pruner 'snip'): no data for site {site.key}; "
                              "call plugin.prepare(model, batches) with task data before attaching")
        h, g = taps  # (tokens, d) each: the sublayer output and dL/d(output)
        w_down, w_up = down.clone().requires_grad_(), up_ref.clone().requires_grad_()
        with torch.enable_grad():
            out = F.linear(dense.act(F.linear(h, w_down, dense.down.bias.detach())), w_up)  # (tokens, d)
            g_down, g_up = torch.autograd.grad((out * g).sum(), [w_down, w_up])
        return (w_down * g_down).abs().detach(), (w_up * g_up).abs().detach()

    @staticmethod
    def large_sparse(cfg: dict[str, Any], factor: int = 2) -> dict[str, Any]:
        """The Large-Sparse variant of `cfg`: `factor` x wider, pruned so that it keeps about as many
        weights (kept fraction divided by `factor`)."""
        return {**cfg, "bottleneck": cfg["bottleneck"] * factor,
                "sparsity": 1.0 - (1.0 - cfg["sparsity"]) / factor}
