"""Prefix tuning (Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021).

Every chosen attention gets l learned keys and values in front of its own (the kv_prefix mechanism of
`mechanisms/kv_prefix.py`). Training them directly is unstable, so the paper reparameterises the prefix during
training: P = MLP(P'), with P' a small (l x d) embedding and MLP = Linear(d, h) -> tanh ->
Linear(h, layers * 2 * d). The last Linear's output is one block per layer, so here each placement
owns its block, Linear(h, 2 * kv_heads * head_dim), and the embedding and first Linear are shared by
all placements of one attention kind of one stack (Li & Liang's BART keeps separate ones for the
encoder, the decoder and the cross-attention). After training, `freeze_prefix()` computes the prefix
once and drops the MLP, as the paper does; the frozen keys/values load into a `reparam=False` placement.

A prefix changes the attention from the first step, so a fresh module is not the identity.
"""

from __future__ import annotations

from typing import Any

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.parts.prefix import (
    PrefixModule,
    build_prefix,
    prefix_activations,
    prefix_count,
    prefix_dims,
    prefix_shared_count,
    prefix_shared_key,
)
from petlsearch.searchspace.dims import Dim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, attention_sites


class PrefixTuning(Plugin):
    name = "prefix_tuning"
    description = "Learned keys/values prepended to every attention, trained through an MLP"
    paper = "Li & Liang, Prefix-Tuning: Optimizing Continuous Prompts for Generation, ACL 2021"
    kinds = ("kv_prefix",)
    recipe = Recipe(lr=3e-4, source=(
        "Li & Liang use 5e-5..8e-5 over epochs; swept 3e-4..3e-3 on MiniLM, 100 steps, seed 0: 3e-4 best "
        "(0.672 validation accuracy; 1e-3: 0.611) (python -m bench --only recipes)"))
    identity_at_init = False

    def __init__(self, roles: tuple[str, ...] = ("attn", "xattn"), max_length: int = 256) -> None:
        self.roles = roles
        self.max_length = max_length

    def sites(self, graph: Any) -> list[Site]:
        return attention_sites(graph, "kv_prefix", roles=self.roles)

    def dims(self, site: Site) -> dict[str, Dim]:
        return prefix_dims(site, max_length=self.max_length)

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return prefix_count(site, cfg)

    def shared_key(self, site: Site, cfg: dict[str, Any]) -> Any:
        return prefix_shared_key(site, cfg)

    def shared_count(self, site: Site, cfg: dict[str, Any]) -> int:
        return prefix_shared_count(site, cfg)

    def build(self, site: Site, cfg: dict[str, Any]) -> PrefixModule:
        return build_prefix(self, site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        return prefix_activations(site, cfg, shape)
