"""DSEE: a low-rank plus sparse weight update (Chen et al., "DSEE: Dually Sparsity-embedded
Efficient Tuning of Pre-trained Language Models", ACL 2023).

dW = (alpha / r) U V + S on one weight: U V of rank r (LoRA-style, U zero at init) and S with N
trainable entries at a fixed support Omega. As in the paper, Omega comes from decomposing the
pretrained weight W ~ L + S0 (L of rank r, S0 with N entries; a few GreBsmo-style alternations of a
truncated SVD and a top-N residual) and taking the support of S0; after `prepare(model, batches)`
the support is instead the N entries with the largest data score (empirical Fisher, or SNIP).
The update merges into the weight. `prune` is the paper's optional second stage: magnitude or
attention-head pruning of the final (merged) weights, reporting inference parameters and FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import WeightDelta
from petlsearch.plugins.parts.masks import param_name, top_indices
from petlsearch.searchspace.dims import Dim, IntDim
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.roles import LINEAR_TYPES
from petlsearch.searchspace.sites import PROJECTIONS, Site, node_sites

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from petlsearch.searchspace.graph import Node

__all__ = ["DSEE", "DSEEDelta", "PruneReport", "prune", "residual_support"]


def residual_support(weight: torch.Tensor, rank: int, entries: int, iters: int = 2) -> torch.Tensor:
    """Support of the sparse part of W ~ L + S (rank(L) <= rank, S with `entries` non-zeros):
    alternate L = SVD_rank(W - S) and S = top-|.|(W - L); flat indices, sorted."""
    w = weight.detach().float()
    sparse = torch.zeros_like(w)
    for _ in range(max(1, iters)):
        residual = (w - _best_low_rank(w - sparse, rank)).flatten()
        idx = residual.abs().topk(entries).indices
        sparse = torch.zeros_like(residual).index_put_((idx,), residual[idx]).view_as(w)
    return idx.sort().values


def _best_low_rank(a: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-`rank` truncated SVD of `a` (randomised for large matrices: a 4096 x 4096 weight
    costs a fraction of a second instead of seconds)."""
    if min(a.shape) <= 256:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]
    u, s, v = torch.svd_lowrank(a, q=min(rank + 8, min(a.shape)), niter=2)
    return (u[:, :rank] * s[:rank]) @ v[:, :rank].T


class DSEEDelta(WeightDelta):
    """W -> W + gate ((alpha/r) B A + scatter(S)); the support is chosen when installed."""

    def __init__(self, site: Site, cfg: dict[str, Any], support: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(site)
        rows, cols = site.get("shape")
        r, n = cfg["rank"], cfg["sparse"]
        self.scaling = cfg["alpha"] / r
        self.lora_A = nn.Parameter(torch.empty(r, cols))  # (r, cols)
        self.lora_B = nn.Parameter(torch.zeros(rows, r))  # (rows, r): zero, so dW = 0 at init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("indices", torch.zeros(n, dtype=torch.long))  # (N,) flat support, persistent
        self.sparse = nn.Parameter(torch.zeros(n))  # (N,) values of S
        self._support = support

    def install(self, model: nn.Module) -> None:
        from torch.nn.utils import parametrize

        target = model.get_submodule(self.site.path)
        name = self.site.param or "weight"
        weight = target.parametrizations[name].original if parametrize.is_parametrized(target, name) \
            else getattr(target, name)
        with torch.no_grad():
            self.indices.copy_(self._support(weight).to(self.indices.device))
        super().install(model)

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        low = self.gated(self.lora_B @ self.lora_A * self.scaling).to(weight.dtype)
        flat = (weight + low).reshape(-1).index_add(0, self.indices, self.gated(self.sparse).to(weight.dtype))
        return flat.view_as(weight)

    def delta_weight(self) -> torch.Tensor:
        low = self.lora_B @ self.lora_A * self.scaling
        return low.reshape(-1).index_add(0, self.indices, self.sparse).view_as(low)


class DSEE(Plugin):
    name = "dsee"
    description = "Low-rank update U V plus a sparse update S on a chosen support"
    paper = "Chen et al., DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models, ACL 2023"
    kinds = ("weight",)
    recipe = Recipe(lr=1e-3, source=(
        "1e-3 on MiniLM, 100 steps: 0.757 test accuracy over 3 seeds (python -m bench --only zoo)"))
    mergeable = True

    def __init__(self, roles: tuple[str, ...] = PROJECTIONS, max_rank: int = 64, max_sparse: int = 4096,
                 data_score: str = "fisher", decompose_iters: int = 2, num_samples: int = 256) -> None:
        if data_score not in ("fisher", "snip"):
            raise PluginError(f"plugin 'dsee': data_score {data_score!r} is not one of ['fisher', 'snip']")
        self.roles = roles
        self.max_rank = max_rank
        self.max_sparse = max_sparse
        self.data_score = data_score
        self.decompose_iters = decompose_iters
        self.num_samples = num_samples

    def sites(self, graph: Any) -> list[Site]:
        out = []
        for site in node_sites(graph, "weight", roles=self.roles, param="weight"):
            shape = tuple(graph.node(site.path).params["weight"])
            if len(shape) == 2:
                out.append(site.with_extra(shape=shape))
        return out

    def dims(self, site: Site) -> dict[str, Dim]:
        rows, cols = site.get("shape")
        high_r = max(1, min(self.max_rank, rows, cols))
        high_n = max(1, min(self.max_sparse, rows * cols))
        return {
            "rank": IntDim("rank", default=min(8, high_r), low=1, high=high_r, log=True, help="rank r of U V"),
            "sparse": IntDim("sparse", default=min(64, high_n), low=1, high=high_n, log=True,
                             help="number N of trainable entries of the sparse update S"),
            "alpha": IntDim("alpha", default=16, low=1, high=128, log=True, help="U V scaled by alpha / r"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        rows, cols = site.get("shape")
        return cfg["rank"] * (rows + cols) + cfg["sparse"]

    def prepare(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Optional: score every candidate weight on task data; supports then follow the scores."""
        from petlsearch import scoring

        names = [param_name(s) for s in self.sites(ModelGraph.from_model(model))]
        if self.data_score == "fisher":
            scores = scoring.fisher_scores(model, batches, params=names, num_samples=self.num_samples)
        else:
            scores = scoring.snip_scores(model, batches, params=names, num_samples=self.num_samples)
        self._scores = {n: s.cpu() for n, s in scores.items()}

    def support(self, site: Site, cfg: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        """How the placement picks its sparse support from the pretrained weight."""
        scores = getattr(self, "_scores", {}).get(param_name(site))
        if scores is not None:
            return lambda _weight: top_indices(scores, cfg["sparse"])
        return lambda weight: residual_support(weight, cfg["rank"], cfg["sparse"], self.decompose_iters)

    def build(self, site: Site, cfg: dict[str, Any]) -> DSEEDelta:
        return DSEEDelta(site, cfg, self.support(site, cfg))



# ------------------------------------------------------------------------------ post-training pruning
@dataclass
class PruneReport:
    """The pruned model at inference: parameters left (all of the model's, minus removed entries)
    and forward FLOPs for one sequence of `seq_len` tokens (2 per multiply-add of a kept weight
    entry, plus QK^T and AV of the kept heads)."""

    method: str
    sparsity: float
    seq_len: int
    params: int
    flops: int
    removed: int
    pruned_heads: dict[str, list[int]] = field(default_factory=dict)


def prune(model: nn.Module, method: str = "magnitude", sparsity: float = 0.5, seq_len: int = 128,
          roles: tuple[str, ...] = PROJECTIONS) -> PruneReport:
    """Prune the final weights in place and report the pruned model's size and cost.

    Weight updates still attached (DSEE, LoRA-like WeightDelta modules) are merged first.
    'magnitude': each weight of `roles` keeps its round((1 - sparsity) n) largest entries.
    'heads': each attention layer drops its round(sparsity * heads) heads of smallest L1 norm (the
    head's q, k, v rows and o columns), by zeroing those rows (and biases) and columns.
    """
    if method not in ("magnitude", "heads") or not 0.0 <= sparsity <= 1.0:
        raise PluginError(f"prune: method {method!r} / sparsity {sparsity} invalid; "
                          "method is 'magnitude' or 'heads', sparsity in [0, 1]")
    for module in [m for m in model.modules() if isinstance(m, WeightDelta)]:
        module.merge()
    graph = ModelGraph.from_model(model)
    masks: dict[str, list[torch.Tensor | None]] = {}  # path -> [weight kept mask, bias kept mask]
    pruned_heads: dict[str, list[int]] = {}
    if method == "magnitude":
        for node in graph.find(role=roles):
            weight = model.get_submodule(node.path).weight
            keep = round((1.0 - sparsity) * weight.numel())
            mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            mask[weight.detach().abs().flatten().topk(keep).indices] = True
            masks[node.path] = [mask.view_as(weight), None]
    else:
        for attn in graph.find(role=("attn", "xattn")):
            heads = _prune_heads(model, graph, attn, sparsity, masks)
            if heads:
                pruned_heads[attn.name] = heads
    removed = 0
    with torch.no_grad():
        for path, (wmask, bmask) in masks.items():
            module = model.get_submodule(path)
            module.weight.mul_(wmask)
            removed += int((~wmask).sum())
            if bmask is not None:
                module.bias.mul_(bmask)
                removed += int((~bmask).sum())
    total = sum(p.numel() for p in model.parameters())
    return PruneReport(method, sparsity, seq_len, total - removed, _flops(model, graph, masks, pruned_heads, seq_len),
                       removed, pruned_heads)


def _head_parts(graph: ModelGraph, attn: Node, heads: int, hd: int) -> list[tuple[Node, int, str]]:
    """(node, offset of head 0's units, 'out' or 'in') for the projections a head owns; GQA keys
    and values (fewer heads) are handled apart."""
    prefix = attn.role
    find = lambda r: graph.find(role=f"{prefix}.{r}", stack=attn.stack, layer=attn.layer)  # noqa: E731
    parts = [(n, 0, "in") for n in find("o")]
    for n in find("qkv"):
        parts += [(n, i * heads * hd, "out") for i in range(3)]
    parts += [(n, 0, "out") for n in find("q")]
    parts += [(n, 0, "out") for r in ("k", "v") for n in find(r) if n.out_features == heads * hd]
    return parts


def _units(masks: dict, model: nn.Module, node: Node, start: int, size: int, where: str) -> tuple[Any, ...]:
    """Register kept masks for `node` and return the index of units [start, start+size) along the
    output (where='out') or input axis of its weight (GPT-2's Conv1D stores (in, out))."""
    module = model.get_submodule(node.path)
    if node.path not in masks:
        bias = getattr(module, "bias", None)
        masks[node.path] = [torch.ones_like(module.weight, dtype=torch.bool),
                            None if bias is None else torch.ones_like(bias, dtype=torch.bool)]
    out_axis = 1 if node.type == "Conv1D" else 0
    axis = out_axis if where == "out" else 1 - out_axis
    index: list[Any] = [slice(None), slice(None)]
    index[axis] = slice(start, start + size)
    return tuple(index)


def _prune_heads(model: nn.Module, graph: ModelGraph, attn: Node, sparsity: float, masks: dict) -> list[int]:
    heads = graph.num_heads(attn.stack or "") or 1
    hd = (graph.hidden_size(attn.stack or "") or 0) // heads
    parts = _head_parts(graph, attn, heads, hd)
    n_prune = round(sparsity * heads)
    if not parts or n_prune == 0 or hd == 0:
        return []
    scores = torch.zeros(heads)
    for h in range(heads):
        for node, offset, where in parts:
            index = _units(masks, model, node, offset + h * hd, hd, where)
            scores[h] += float(model.get_submodule(node.path).weight.detach()[index].abs().sum())
    pruned = sorted(scores.argsort()[:n_prune].tolist())
    for h in pruned:
        for node, offset, where in parts:
            masks[node.path][0][_units(masks, model, node, offset + h * hd, hd, where)] = False
            if where == "out" and masks[node.path][1] is not None:
                masks[node.path][1][offset + h * hd: offset + (h + 1) * hd] = False
    _prune_kv_groups(model, graph, attn, heads, hd, set(pruned), masks)
    return pruned


def _prune_kv_groups(model: nn.Module, graph: ModelGraph, attn: Node, heads: int, hd: int,
                     pruned: set[int], masks: dict) -> None:
    """Grouped-query attention: a key/value head goes only when every query head of its group does."""
    for r in ("k", "v"):
        for node in graph.find(role=f"{attn.role}.{r}", stack=attn.stack, layer=attn.layer):
            kv_heads = (node.out_features or 0) // hd if hd else 0
            if kv_heads in (0, heads) or heads % kv_heads:
                continue
            group = heads // kv_heads
            for j in range(kv_heads):
                if all(h in pruned for h in range(j * group, (j + 1) * group)):
                    masks[node.path][0][_units(masks, model, node, j * hd, hd, "out")] = False
                    if masks[node.path][1] is not None:
                        masks[node.path][1][j * hd:(j + 1) * hd] = False


def _flops(model: nn.Module, graph: ModelGraph, masks: dict, pruned_heads: dict[str, list[int]], seq: int) -> int:
    flops = 0
    for node in graph.nodes.values():
        if node.type in LINEAR_TYPES and "weight" in node.params:
            kept = int(masks[node.path][0].sum()) if node.path in masks else math.prod(node.params["weight"])
            flops += 2 * seq * kept
    for attn in graph.find(role=("attn", "xattn")):
        heads = graph.num_heads(attn.stack or "") or 1
        hd = (graph.hidden_size(attn.stack or "") or 0) // heads
        active = heads - len(pruned_heads.get(attn.name, []))
        flops += 2 * 2 * seq * seq * hd * active  # scores Q K^T and the weighted sum A V
    return flops
