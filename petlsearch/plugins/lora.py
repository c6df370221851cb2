"""LoRA: a trainable low-rank update B A beside a frozen projection (Hu et al., 2021).

out = W x + (alpha / r) * B A dropout(x), with A (r x in) Kaiming-uniform and B (out x r) zero,
so a fresh module leaves the model unchanged. Works on Linear, GPT-2's Conv1D (fused qkv
included) and 1x1 Conv2d; merging adds (alpha / r) B A to the weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import OutputDelta, stored_parameter
from petlsearch.searchspace.dims import Dim, FloatDim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import PROJECTIONS, Site, node_sites


class LoRAModule(OutputDelta):
    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        super().__init__(site)
        r, fin, fout = cfg["rank"], site.in_features, site.out_features
        self.scaling = cfg["alpha"] / r
        self.conv = site.get("conv", False)
        self.lora_A = nn.Parameter(torch.empty(r, fin))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(fout, r))  # (out, r): zero, so the update starts at 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg["dropout"]) if cfg["dropout"] > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if self.conv:  # (B, C, H, W): a 1x1 convolution is a Linear over channels
            a = F.conv2d(x, self.lora_A[:, :, None, None])
            return F.conv2d(a, self.lora_B[:, :, None, None]) * self.scaling
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def merge(self) -> None:
        target = self._hosts[0]
        with torch.no_grad():
            update = self.gated(self.lora_B @ self.lora_A * self.scaling)  # (out, in)
        self.uninstall()
        weight = stored_parameter(target, "weight")
        with torch.no_grad():
            if type(target).__name__ == "Conv1D":  # GPT-2 stores (in, out)
                weight += update.T
            elif self.conv:
                weight += update[:, :, None, None]
            else:
                weight += update


def _lora_target(site: Site) -> bool:
    return site.in_features is not None and site.out_features is not None


class LoRA(Plugin):
    name = "lora"
    description = "Low-rank update B A added to a frozen projection's output"
    paper = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022"
    kinds = ("weight",)
    recipe = Recipe(lr=1e-3, source=(
        "Hu et al. use 4e-4..5e-4 on RoBERTa-base over 60 epochs; 1e-3 on every projection of MiniLM, 100 "
        "steps: 0.762 test accuracy over 3 seeds, 1e-2 stayed at the majority class (python -m bench --only "
        "zoo)"))
    mergeable = True

    def __init__(self, roles: tuple[str, ...] = PROJECTIONS + ("pool", "conv"), max_rank: int = 64) -> None:
        self.roles = roles
        self.max_rank = max_rank

    def sites(self, graph: Any) -> list[Site]:
        sites = []
        for site in node_sites(graph, "weight", roles=self.roles, param="weight"):
            node = graph.node(site.path)
            if node.role == "conv":
                kernel = node.params["weight"]
                if len(kernel) != 4 or kernel[2:] != (1, 1) or "Depthwise" in node.type:
                    continue  # 1x1 convolutions only
                site = site.with_extra(conv=True)
            if _lora_target(site):
                sites.append(site)
        return sites

    def dims(self, site: Site) -> dict[str, Dim]:
        high = max(1, min(self.max_rank, site.in_features or 1, site.out_features or 1))
        return {
            "rank": IntDim("rank", default=min(8, high), low=1, high=high, log=True, help="rank r of B A"),
            "alpha": IntDim("alpha", default=16, low=1, high=128, log=True, help="scaling alpha (update x alpha/r)"),
            "dropout": FloatDim("dropout", default=0.0, low=0.0, high=0.5, help="dropout on the LoRA input"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["rank"] * (site.in_features + site.out_features)

    def build(self, site: Site, cfg: dict[str, Any]) -> LoRAModule:
        return LoRAModule(site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        return shape.tokens * (site.in_features + cfg["rank"])

