"""Prompt tuning: a trainable soft prompt prepended to the input embeddings (Lester et al., 2021).

n prompt vectors (n, H) are prepended at the word-embedding level, before position embeddings are
added, in every sequence of the batch; the attention mask is extended with ones and token_type_ids
with zeros, as Hugging Face peft's PromptTuning does, so a prompt gives the same outputs here and in
peft. Initialisation as in the paper: "random" uniform in [-0.5, 0.5], or "vocab", rows sampled from
the frozen word-embedding table (the better of the two in the paper). One site per text stack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.tokens import TokenModule, input_sites, token_activations
from petlsearch.plugins.parts.prompts import INITS, init_from_vocab, max_prompt_length
from petlsearch.searchspace.dims import ChoiceDim, Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site


class SoftPrompt(TokenModule):
    level = "input"

    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        super().__init__(site)
        self.init = cfg["init"]
        self.prompt = nn.Parameter(torch.empty(cfg["length"], site.in_features).uniform_(-0.5, 0.5))  # (n, H)

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        if self.init == "vocab":
            init_from_vocab(self.prompt, model, self.site)
        super().hook(model, target)

    def tokens(self, embeds: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        return self.prompt


class PromptTuning(Plugin):
    name = "prompt_tuning"
    description = "Trainable soft prompt prepended to the input embeddings"
    paper = "Lester et al., The Power of Scale for Parameter-Efficient Prompt Tuning, EMNLP 2021"
    kinds = ("tokens",)
    recipe = Recipe(lr=0.3, source=(
        "Lester et al.: 0.3 (Adafactor); on MiniLM in 100 steps no rate from 3e-2 to 0.3 leaves the majority "
        "class (python -m bench --only recipes)"))
    identity_at_init = False  # prepended tokens change the outputs from the start

    def __init__(self, max_length: int = 100) -> None:
        self.max_length = max_length

    def sites(self, graph: Any) -> list[Site]:
        return input_sites(graph)

    def dims(self, site: Site) -> dict[str, Dim]:
        high = max_prompt_length(site, self.max_length)
        return {
            "length": IntDim("length", default=min(20, high), low=1, high=high, log=True,
                             help="number of prompt tokens n"),
            "init": ChoiceDim("init", default="vocab", choices=INITS,
                              help="random uniform [-0.5, 0.5], or rows of the word-embedding table"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["length"] * site.in_features

    def build(self, site: Site, cfg: dict[str, Any]) -> SoftPrompt:
        return SoftPrompt(site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        return token_activations(site, cfg["length"], shape)

    def added_tokens(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["length"]
