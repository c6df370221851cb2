"""LayerNorm tuning as a third-party petlsearch plugin (Zhao et al., "Tuning LayerNorm in Attention:
Towards Efficient Multi-Modal LLM Fine-tuning", 2023): train the gains of normalisation layers.
Registered through this package's own `petlsearch.plugins` entry point.

One searchable hyperparameter shows how a plugin declares one: `groups`, the number of gain offsets
per layer (each shared by a group of adjacent channels). Its default, one per channel, is the paper's
method; a search under a tight budget may pick fewer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.plugins import ChoiceDim, Plugin
from petlsearch.plugins.mechanisms.hooks import WeightDelta
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, node_sites


class GainOffset(WeightDelta):
    """gamma -> gamma + gate * delta, delta starting at zero (identity at init): one offset per group
    of size // groups adjacent channels."""

    def __init__(self, site: Site, size: int, groups: int) -> None:
        super().__init__(site)
        self.delta = nn.Parameter(torch.zeros(groups))
        self.repeat = size // groups

    def delta_weight(self) -> torch.Tensor:
        return self.delta.repeat_interleave(self.repeat)


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
        n = site.get("size")
        groups = tuple(g for g in (n // 4, n // 2, n) if g and n % g == 0)
        return {"groups": ChoiceDim("groups", default=n, choices=groups, help="gain offsets per layer")}

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["groups"]

    def build(self, site: Site, cfg: dict[str, Any]) -> GainOffset:
        return GainOffset(site, site.get("size"), cfg["groups"])
