"""KAdaptation: a weight update as a sum of Kronecker products (He et al., "Parameter-efficient Model
Adaptation for Vision Transformers", AAAI 2023).

dW = sum_i A_i kron B_i (i = 1..n), with A_i (n x n) slow weights shared by every placement (n^3
parameters, counted once) and B_i = u_i v_i^T low-rank fast weights of each weight
((rows/n x r)(r x cols/n), r (rows + cols) parameters). The v_i start at zero, so dW = 0 at
init; dW is added to the frozen weight through a parametrization (any Linear, GPT-2's Conv1D in its
own (in, out) layout), and merges into it. The paper first selects the submodules to adapt by
their local intrinsic dimension: `rank_sites` does that with `petlsearch.scoring`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import WeightDelta
from petlsearch.plugins.parts.kronecker import SlowWeights, kron_sum, low_rank_factors
from petlsearch.searchspace.dims import ChoiceDim, Dim, IntDim
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import ATTN_PROJECTIONS, Site, node_sites

if TYPE_CHECKING:
    from collections.abc import Iterable

    from petlsearch.scoring import IntrinsicDimension


class KroneckerDelta(WeightDelta):
    def __init__(self, site: Site, cfg: dict[str, Any], slow: SlowWeights) -> None:
        super().__init__(site)
        n, r = cfg["n"], cfg["rank"]
        rows, cols = site.get("shape")
        self.shared_slow = slow  # a `shared_*` child, counted once by the plugin
        u, _ = low_rank_factors(n, rows // n, cols // n, r, 2.0 / (rows + cols))
        self.u = nn.Parameter(u)  # (n, rows/n, r)
        self.v = nn.Parameter(torch.zeros(n, r, cols // n))  # (n, r, cols/n): zero, so dW = 0 at init
        self.scaling = cfg["alpha"] / r

    def delta_weight(self) -> torch.Tensor:
        return kron_sum(self.shared_slow.A, self.u @ self.v) * self.scaling  # (rows, cols)


class KAdaptation(Plugin):
    name = "kadaptation"
    description = "Weight update sum_i A_i kron (u_i v_i^T), slow A_i shared by all layers"
    paper = "He et al., Parameter-efficient Model Adaptation for Vision Transformers, AAAI 2023"
    kinds = ("weight",)
    recipe = Recipe(lr=3e-3, source=(
        "swept 1e-3..3e-2 on MiniLM, 100 steps, seed 0: 3e-3 best (0.740 validation accuracy; 1e-3: 0.623) "
        "(python -m bench --only recipes)"))
    mergeable = True

    def __init__(self, roles: tuple[str, ...] = ATTN_PROJECTIONS, n_choices: tuple[int, ...] = (2, 4, 8, 16),
                 max_rank: int = 8) -> None:
        self.roles = roles
        self.n_choices = n_choices
        self.max_rank = max_rank

    def _ns(self, site: Site) -> tuple[int, ...]:
        g = math.gcd(*site.get("shape"))
        return tuple(n for n in self.n_choices if g % n == 0)

    def sites(self, graph: Any) -> list[Site]:
        out = []
        for site in node_sites(graph, "weight", roles=self.roles, param="weight"):
            shape = graph.node(site.path).params["weight"]
            if len(shape) == 2:
                site = site.with_extra(shape=tuple(shape))
                if self._ns(site):
                    out.append(site)
        return out

    def dims(self, site: Site) -> dict[str, Dim]:
        ns = self._ns(site)
        rows, cols = site.get("shape")
        high = max(1, min(self.max_rank, min(rows, cols) // min(ns)))
        return {
            "n": ChoiceDim("n", default=4 if 4 in ns else ns[0], choices=ns,
                           help="number of Kronecker products (A_i are n x n); divides both weight dims"),
            "rank": IntDim("rank", default=1, low=1, high=high, help="rank r of the fast weights u_i v_i^T"),
            "alpha": IntDim("alpha", default=1, low=1, high=64, log=True, help="update scaled by alpha / r"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        rows, cols = site.get("shape")
        return cfg["rank"] * (rows + cols)

    def shared_key(self, site: Site, cfg: dict[str, Any]) -> Any:
        return ("kronecker_slow_weights", cfg["n"])

    def shared_count(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["n"] ** 3

    def build(self, site: Site, cfg: dict[str, Any]) -> KroneckerDelta:
        n = cfg["n"]
        return KroneckerDelta(site, cfg, self.shared(self.shared_key(site, cfg), lambda: SlowWeights(n)))

    def rank_sites(self, model: nn.Module, graph: Any, batches: Iterable[dict[str, torch.Tensor]],
                   **kwargs: Any) -> list[tuple[Site, IntrinsicDimension]]:
        """The paper's submodule selection: the sites grouped by their submodule (the attention or FFN
        module holding the weight), ordered by the submodule's local intrinsic dimension, lowest
        first (a low dimension is reached well in a small subspace); unreached ones last.
        `kwargs` go to `petlsearch.scoring.local_intrinsic_dimension` (dims, threshold, steps, ...)."""
        from petlsearch.scoring import local_intrinsic_dimension

        sites = self.sites(graph)
        owners = {s.key: s.path.rsplit(".", 1)[0] for s in sites}
        dims = local_intrinsic_dimension(model, batches, sorted(set(owners.values())), **kwargs)

        def key(s: Site) -> tuple[float, str]:
            d = dims[owners[s.key]].dimension
            return (math.inf if d is None else d, s.key)

        return [(s, dims[owners[s.key]]) for s in sorted(sites, key=key)]
