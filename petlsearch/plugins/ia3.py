"""(IA)^3: learned vectors that rescale keys, values and the FFN's inner activations (Liu et al., 2022).

K -> l_k * K, V -> l_v * V, and the input of the FFN's down-projection -> l_ff * h; vectors start
at one (identity). Follows peft's placement: on a fused qkv projection the whole output is scaled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import Scale, stored_parameter
from petlsearch.searchspace.dims import Dim
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, node_sites

OUTPUT_ROLES = ("attn.k", "attn.v", "attn.qkv", "xattn.k", "xattn.v")
INPUT_ROLES = ("ffn.down",)


class IA3Module(Scale):
    def __init__(self, site: Site) -> None:
        super().__init__(site)
        size = site.in_features if site.get("where") == "input" else site.out_features
        self.ia3_l = nn.Parameter(torch.ones(size))

    def scale(self) -> torch.Tensor:
        return self.ia3_l

    def merge(self) -> None:
        target = self._hosts[0]
        with torch.no_grad():
            l = self.effective().detach()
        self.uninstall()
        conv1d = type(target).__name__ == "Conv1D"  # weight stored (in, out)
        weight, bias = stored_parameter(target, "weight"), stored_parameter(target, "bias")
        with torch.no_grad():
            if self.site.get("where") == "input":
                weight *= l[:, None] if conv1d else l[None, :]
            else:
                weight *= l[None, :] if conv1d else l[:, None]
                if bias is not None:
                    bias *= l


class IA3(Plugin):
    name = "ia3"
    description = "Learned rescaling of keys, values and FFN activations"
    paper = "Liu et al., Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning, NeurIPS 2022"
    kinds = ("scale",)
    recipe = Recipe(lr=3e-2, source=(
        "Liu et al. train (IA)^3 at 3e-3 for 1,000 steps; swept 1e-3..3e-2 on MiniLM, 100 steps, seed 0: 3e-2"
        " best (0.758 validation accuracy; 1e-3: 0.613) (python -m bench --only recipes)"))
    mergeable = True

    def sites(self, graph: Any) -> list[Site]:
        return (node_sites(graph, "scale", roles=OUTPUT_ROLES, where="output")
                + node_sites(graph, "scale", roles=INPUT_ROLES, where="input"))

    def dims(self, site: Site) -> dict[str, Dim]:
        return {}

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return site.in_features if site.get("where") == "input" else site.out_features

    def build(self, site: Site, cfg: dict[str, Any]) -> IA3Module:
        return IA3Module(site)
