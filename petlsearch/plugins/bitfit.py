"""BitFit: train only the bias terms (Ben Zaken et al., 2022).

Each bias site gets a zero-initialised offset added to the frozen bias through a
parametrization, so the gate scales the offset and detaching restores the original bias.
Sites cover every projection, norm (LayerNorm beta, BatchNorm beta: 'BitFit/BN'), pooler and
convolution bias; a strategy chooses the subset.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import WeightDelta
from petlsearch.searchspace.dims import Dim
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import PROJECTIONS, Site, node_sites


class BiasOffset(WeightDelta):
    def __init__(self, site: Site, size: int) -> None:
        super().__init__(site)
        self.bias = nn.Parameter(torch.zeros(size))

    def delta_weight(self) -> torch.Tensor:
        return self.bias


class BitFit(Plugin):
    name = "bitfit"
    description = "Train the bias terms only"
    paper = "Ben Zaken et al., BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models, ACL 2022"
    kinds = ("weight",)
    recipe = Recipe(lr=1e-3, source=(
        "Ben Zaken et al. use 1e-4..1e-3; on MiniLM in 100 steps no rate from 3e-3 to 1e-1 leaves the "
        "majority class on seed 0 (0.611 validation accuracy), 1e-3 reaches 0.617 (python -m bench --only "
        "recipes, python -m bench --only zoo)"))
    mergeable = True

    def __init__(self, roles: tuple[str, ...] = PROJECTIONS + ("norm", "pool", "conv")) -> None:
        self.roles = roles

    def sites(self, graph: Any) -> list[Site]:
        return [s.with_extra(size=graph.node(s.path).params["bias"][0])
                for s in node_sites(graph, "weight", roles=self.roles, param="bias")]

    def dims(self, site: Site) -> dict[str, Dim]:
        return {}

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return site.get("size")

    def build(self, site: Site, cfg: dict[str, Any]) -> BiasOffset:
        return BiasOffset(site, site.get("size"))
