"""LayerNorm tuning as a third-party petlsearch plugin (Zhao et al., "Tuning LayerNorm in Attention:
Towards Efficient Multi-Modal LLM Fine-tuning", 2023): train the gains (and optionally the biases)
of normalisation layers. Registered through this package's own `petlsearch.plugins` entry point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.plugins import ChoiceDim, Plugin
from petlsearch.plugins.base import Site, WeightDelta
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import node_sites


class GainOffset(WeightDelta):
    """gamma -> gamma + gate * delta, delta starting at zero (identity at init)."""

    def __init__(self, site: Site, size: int) -> None:
        super().__init__(site)
        self.delta = nn.Parameter(torch.zeros(size))

    def delta_weight(self) -> torch.Tensor:
        return self.delta


class LNTuning(Plugin):
    name = "ln_tuning"
    description = "Train the gains of LayerNorm / RMSNorm layers"
    paper = "Zhao et al., Tuning LayerNorm in Attention, 2023"
    kinds = ("weight",)
    mergeable = True
    # how its modules train; a plugin that declares none trains at petlsearch's DEFAULT_RECIPE (1e-3)
    recipe = Recipe(lr=1e-2, source="swept 1e-3..3e-2 on MiniLM, 100 steps, seed 0: 1e-2 best (0.744 "
                    "validation accuracy; 1e-3: 0.619) (python -m bench --only recipes)")

    def __init__(self, roles: tuple[str, ...] = ("norm",)) -> None:
        self.roles = roles

    def sites(self, graph: Any) -> list[Site]:
        return [s.with_extra(size=graph.node(s.path).params["weight"][0])
                for s in node_sites(graph, "weight", roles=self.roles, param="weight")]

    def dims(self, site: Site) -> dict[str, ChoiceDim]:
        return {}

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return site.get("size")

    def build(self, site: Site, cfg: dict[str, Any]) -> GainOffset:
        return GainOffset(site, site.get("size"))
