"""FISH mask: train only the k entries of a weight with the largest Fisher information (Sung et al.,
"Training Neural Networks with Fixed Sparse Masks", NeurIPS 2021).

`prepare(model, batches)` computes the empirical Fisher of every candidate weight on task data
(mean of per-sample squared gradients, `petlsearch.scoring.fisher_scores`). A placement keeps the k
entries of its weight with the largest scores, stored as flat int indices (a persistent buffer, so
the mask survives a safetensors save/load) and a trainable vector of k values; the effective weight
is W + scatter(values), computed with one index_add that touches only the masked entries. The
paper's global mask (top-k over all weights at once) is `global_allocation`, which gives the k of
each site: the per-site top-k masks with those k are the global mask.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import Plugin, Site, WeightDelta
from petlsearch.plugins.dims import Dim, IntDim
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.sites import PROJECTIONS, node_sites

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)


def param_name(site: Site) -> str:
    return f"{site.path}.{site.param or 'weight'}" if site.path else site.param or "weight"


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest scores, sorted (for a cache-friendly scatter)."""
    return scores.flatten().topk(k).indices.sort().values


class SparseDelta(WeightDelta):
    """W -> W + scatter(values at indices); `values` (k,) is the only trainable tensor."""

    def __init__(self, site: Site, indices: torch.Tensor, shape: tuple[int, ...]) -> None:
        super().__init__(site)
        self.shape = tuple(shape)
        self.register_buffer("indices", indices.long().clone())  # (k,) flat positions, persistent
        self.values = nn.Parameter(torch.zeros(indices.numel()))  # (k,): zero, the identity at init

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
