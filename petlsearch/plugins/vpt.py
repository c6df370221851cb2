"""VPT: visual prompt tuning, shallow and deep (Jia et al., Visual Prompt Tuning, ECCV 2022).

Learnable tokens go after the first token ([CLS]) at the input of a block. Every block of a stack
that has an embeddings module (ViT, CLIP's vision tower, BERT-like text encoders) is a site, so a
strategy chooses the depth: a placement at layer 0 alone is VPT-shallow, one at every layer is
VPT-deep, and any subset is the paper's prompt-depth ablation.

How placements of different layers agree. The first active placement in the forward pass (lowest
layer) inserts its n tokens; every later one REPLACES the token positions that the previous layer
output, as VPT-deep does. Lengths need not agree: a later placement with n tokens replaces the
first min(n, present) positions and, when n is larger, inserts the rest after them (so equal
lengths are exactly the paper, and a search that sizes each layer on its own still gives a valid
model; with fewer tokens the remaining positions carry their previous outputs forward). The mask a
block receives is widened to the positions present at that block (`_tokens.TokenSlots`), and the
stack's output drops them again, so [CLS] and the caller's sequence length are unchanged.

Initialisation as the paper's code: Xavier-uniform with fan-in of the patch embedding
(channels x patch x patch; the hidden size for text) and fan-out H, or N(0, 0.02^2); dropout on the
prompts (the paper tunes 0 or 0.1). Gate g: inserted tokens are g * prompt, replaced positions
move by g * (prompt - old); gate 0 skips the placement.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.tokens import TokenModule, layer_sites, token_activations
from petlsearch.searchspace.dims import ChoiceDim, Dim, FloatDim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site


class LayerPrompt(TokenModule):
    level = "block"

    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        super().__init__(site)
        hidden = site.in_features
        self.prompt = nn.Parameter(torch.empty(cfg["length"], hidden))  # (n, H)
        if cfg["init"] == "xavier":
            fan_in = site.get("patch_fan_in") or hidden
            bound = math.sqrt(6.0 / (fan_in + hidden))
            nn.init.uniform_(self.prompt, -bound, bound)
        else:
            nn.init.normal_(self.prompt, std=0.02)
        self.dropout = nn.Dropout(cfg["dropout"]) if cfg["dropout"] > 0 else nn.Identity()

    def tokens(self, embeds: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        return self.dropout(self.prompt)


class VisualPromptTuning(Plugin):
    name = "vpt"
    description = "Learnable tokens after [CLS] at the input of chosen layers (VPT shallow / deep)"
    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022"
    kinds = ("tokens",)
    recipe = Recipe(lr=3e-2, source=(
        "Jia et al. sweep the base rate per task; on MiniLM, 100 steps, seed 0: 3e-2 (0.633 validation "
        "accuracy) above 0.1 and 0.3 (0.611) (python -m bench --only recipes, python -m bench --only zoo)"))
    identity_at_init = False  # inserted tokens are attended to from the start

    def __init__(self, max_length: int = 200) -> None:
        self.max_length = max_length

    def sites(self, graph: Any) -> list[Site]:
        return layer_sites(graph)

    def dims(self, site: Site) -> dict[str, Dim]:
        return {
            "length": IntDim("length", default=min(10, self.max_length), low=1, high=self.max_length, log=True,
                             help="number of prompt tokens at this layer"),
            "init": ChoiceDim("init", default="xavier", choices=("xavier", "normal"),
                              help="Xavier-uniform over (patch fan-in, H) as the paper, or N(0, 0.02^2)"),
            "dropout": FloatDim("dropout", default=0.0, low=0.0, high=0.5, help="dropout on the prompt tokens"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["length"] * site.in_features

    def build(self, site: Site, cfg: dict[str, Any]) -> LayerPrompt:
        return LayerPrompt(site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        return token_activations(site, cfg["length"], shape)

    def added_tokens(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["length"]
