"""FISH mask: train only the k entries of a weight with the largest Fisher information (Sung et al.,
"Training Neural Networks with Fixed Sparse Masks", NeurIPS 2021).

`prepare(model, batches)` computes the empirical Fisher of every candidate weight on task data
(mean of per-sample squared gradients, `petlsearch.scoring.fisher_scores`). A placement keeps the k
entries of its weight with the largest scores, stored as flat int indices (a persistent buffer, so
the mask survives a safetensors save/load) and a trainable vector of k values; the effective weight
is W + scatter(values), computed with one index_add that touches only the masked entries. The
paper's global mask (top-k over all weights at once) is `global_allocation`, which gives the k of
each site: the per-site top-k masks with those k are the global mask.

On a Linear layer the update runs through its own autograd function (`SparseLinear`) instead of
a weight parametrization: autograd would compute the dense weight gradient (one more matmul per
layer, as costly as full fine-tuning's) only to keep k of its entries. Fisher masks concentrate on
few input features (measured on MiniLM: 4-32% of a projection's columns hold its 0.5% densest
entries), so the values' gradient comes from the gradient of that column (or row) block alone,
and backward keeps only the layer input's masked columns.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import PETLModule, WeightDelta
from petlsearch.plugins.parts.masks import param_name, top_indices
from petlsearch.searchspace.dims import Dim, IntDim
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import PROJECTIONS, Site, node_sites

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)


def sparse_block(indices: torch.Tensor, shape: tuple[int, ...]) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """The smaller block of whole rows or whole columns of a 2-D weight that holds every masked
    entry: (by_rows, the rows or columns, each entry's flat position inside the block)."""
    out_f, in_f = shape
    rows, cols = indices // in_f, indices % in_f
    kept_rows, row_pos = torch.unique(rows, return_inverse=True)
    kept_cols, col_pos = torch.unique(cols, return_inverse=True)
    if kept_rows.numel() * in_f < kept_cols.numel() * out_f:
        return True, kept_rows, row_pos * in_f + cols
    return False, kept_cols, rows * kept_cols.numel() + col_pos


class SparseLinear(torch.autograd.Function):
    """y = x (W + S)^T + b with S = scatter(values at indices), W frozen. Backward: the input's
    gradient through W + S, and the values' gradient from one (block x input) or (output x block)
    matmul over the rows / columns that hold them, never the dense weight gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                values: torch.Tensor, indices: torch.Tensor, block: torch.Tensor, position: torch.Tensor,
                by_rows: bool) -> torch.Tensor:
        w = weight.reshape(-1).index_add(0, indices, values.to(weight.dtype)).view_as(weight)
        ctx.by_rows, ctx.x_dtype, ctx.has_bias = by_rows, x.dtype, bias is not None
        ctx.save_for_backward(x if by_rows else x[..., block], weight, values, indices, block, position)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_kept, weight, values, indices, block, position = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            w = weight.reshape(-1).index_add(0, indices, values.to(weight.dtype)).view_as(weight)
            grad_x = (grad.to(w.dtype) @ w).to(ctx.x_dtype)
        g2 = grad.reshape(-1, grad.shape[-1]).to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            x2 = x_kept.reshape(-1, x_kept.shape[-1]).to(values.dtype)
            sub = g2[:, block].T @ x2 if ctx.by_rows else g2.T @ x2  # (rows, in) or (out, columns)
            grad_values = sub.reshape(-1)[position]
        return grad_x, None, grad_bias, grad_values, None, None, None, None


class SparseDelta(WeightDelta):
    """W -> W + scatter(values at indices); `values` (k,) is the only trainable tensor."""

    def __init__(self, site: Site, indices: torch.Tensor, shape: tuple[int, ...]) -> None:
        super().__init__(site)
        self.shape = tuple(shape)
        self.register_buffer("indices", indices.long().clone())  # (k,) flat positions, persistent
        self.values = nn.Parameter(torch.zeros(indices.numel()))  # (k,): zero, the identity at init
        self._fast = False  # installed on a Linear through SparseLinear (the Linear is _hosts[0])

    def install(self, model: nn.Module) -> None:
        target = model.get_submodule(self.site.path)
        plain_linear = isinstance(target, nn.Linear) and type(target).forward is nn.Linear.forward
        if not plain_linear or (self.site.param or "weight") != "weight":
            super().install(model)  # embeddings, norms, convolutions, quantised Linears: a parametrization
            return
        if hasattr(target, self.child_name) or "forward" in vars(target):
            raise PluginError(f"site '{self.site.key}' already holds a module that replaces its forward")
        target.add_module(self.child_name, self)
        target.forward = self._forward  # an instance attribute: Module.__call__ (and its hooks) use it
        self._hosts.append(target)  # a plain list: assigning the Linear would register a cycle
        self._fast = True

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self._hosts[0]
        weight = linear.weight  # another plugin's parametrization may make it trainable
        if self.gate_off:
            return F.linear(x, weight, linear.bias)
        if weight.requires_grad:  # its dense gradient is needed anyway
            return F.linear(x, self.effective_weight(weight), linear.bias)
        by_rows, block, position = self.block()
        return SparseLinear.apply(x, weight, linear.bias, self.gated(self.values), self.indices, block, position,
                                  by_rows)

    def block(self) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """`sparse_block` of the current mask (recomputed when a load or a move replaces it)."""
        key = (self.indices.data_ptr(), self.indices._version)
        if getattr(self, "_block_key", None) != key:
            self._block, self._block_key = sparse_block(self.indices, self.shape), key
        return self._block

    def uninstall(self) -> None:
        if not self._fast:
            super().uninstall()
            return
        vars(self._hosts[0]).pop("forward", None)
        PETLModule.uninstall(self)  # the child module and the host list, as any hooked module
        self._fast = False

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(-1).index_add(0, self.indices, self.gated(self.values).to(weight.dtype))
        return flat.view_as(weight)

    def delta_weight(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return dense.view(-1).index_add(0, self.indices, self.values).view(self.shape)


class FishMask(Plugin):
    name = "fish_mask"
    description = "Train the k weight entries with the largest empirical Fisher information"
    paper = "Sung et al., Training Neural Networks with Fixed Sparse Masks, NeurIPS 2021"
    kinds = ("weight",)
    recipe = Recipe(lr=1e-3, source=(
        "1e-3 on MiniLM, 100 steps: 0.690 test accuracy over 3 seeds (python -m bench --only zoo); Sung et "
        "al. fine-tune at full fine-tuning's rates over epochs"))
    mergeable = True
    needs_data = True

    def __init__(self, roles: tuple[str, ...] = PROJECTIONS + ("embed", "norm", "pool", "conv"),
                 num_samples: int = 1024, per_sample: bool = True, default_density: float = 0.005) -> None:
        self.roles = roles
        self.num_samples = num_samples
        self.per_sample = per_sample
        self.default_density = default_density

    def sites(self, graph: Any) -> list[Site]:
        return [s.with_extra(shape=tuple(graph.node(s.path).params["weight"]))
                for s in node_sites(graph, "weight", roles=self.roles, param="weight")]

    @staticmethod
    def numel(site: Site) -> int:
        n = 1
        for d in site.get("shape"):
            n *= d
        return n

    def dims(self, site: Site) -> dict[str, Dim]:
        n = self.numel(site)
        return {"k": IntDim("k", default=max(1, min(n, round(self.default_density * n))), low=1, high=n,
                            log=True, help="number of weight entries trained (largest Fisher scores)")}

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["k"]

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        """A Linear projection keeps its input's masked columns (or its whole input when a row block
        is smaller, see `sparse_block`); before `prepare`, the bound min(k, in) columns."""
        dims = site.get("shape")
        if site.role not in PROJECTIONS or len(dims) != 2:
            return 0
        scores = getattr(self, "_scores", {}).get(param_name(site))
        if scores is None:
            return shape.tokens * min(cfg["k"], dims[1])
        by_rows, block, _ = sparse_block(top_indices(scores, cfg["k"]), dims)
        return shape.tokens * (dims[1] if by_rows else block.numel())

    def prepare(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Empirical Fisher of every candidate weight (kept on CPU, float32, one per weight)."""
        from petlsearch.scoring import fisher_scores

        names = [param_name(s) for s in self.sites(ModelGraph.from_model(model))]
        scores = fisher_scores(model, batches, params=names, num_samples=self.num_samples,
                               per_sample=self.per_sample)
        self._scores = {n: s.cpu() for n, s in scores.items()}
        log.info("fish_mask: Fisher scores of %d weights", len(self._scores))

    def scores(self, site: Site) -> torch.Tensor:
        scores = getattr(self, "_scores", {}).get(param_name(site))
        if scores is None:
            raise PluginError(f"plugin 'fish_mask': no Fisher scores for '{param_name(site)}' (site {site.key}); "
                              "call plugin.prepare(model, batches) with task data before attaching")
        return scores

    def build(self, site: Site, cfg: dict[str, Any]) -> SparseDelta:
        return SparseDelta(site, top_indices(self.scores(site), cfg["k"]), site.get("shape"))

    def global_allocation(self, sites: list[Site], k: int) -> dict[str, int]:
        """The paper's mask: the k entries with the largest Fisher scores over all `sites` at once,
        as {site key: entries in that site} (sites with none left out)."""
        flat = torch.cat([self.scores(s).flatten() for s in sites])
        threshold = flat.topk(min(k, flat.numel())).values[-1]
        counts = {s.key: int((self.scores(s) > threshold).sum()) for s in sites}
        ties = k - sum(counts.values())  # entries equal to the threshold, given in site order
        for s in sites:
            take = min(ties, int((self.scores(s) == threshold).sum()))
            counts[s.key] += take
            ties -= take
        return {key: n for key, n in counts.items() if n > 0}
