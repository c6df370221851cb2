"""MAM adapter: the Mix-And-Match adapter of He et al., "Towards a Unified View of Parameter-Efficient
Transfer Learning", ICLR 2022.

The paper's best combination: prefix tuning with a small prefix (l = 30, reparameterised through an
MLP of width 800 as in their code) on the attention, plus a scaled parallel adapter (bottleneck 512,
scale s = 4, ReLU) beside the FFN. One plugin, two site kinds: `kv_prefix` sites (every attention)
build a prefix (`prefix_tuning.py`), `parallel` sites (every FFN) build the parallel adapter
(`adapter.py`). The adapter part starts as the identity (zero up-projection); the prefix does not,
so the plugin as a whole is not the identity at init.
"""

from __future__ import annotations

from typing import Any

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import PETLModule
from petlsearch.plugins.parts import prefix as pt
from petlsearch.plugins.parts.bottleneck import ACTIVATIONS, ParallelAdapterModule, bottleneck_count
from petlsearch.searchspace.dims import ChoiceDim, Dim, FloatDim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, attention_sites, sublayer_sites


class MAMAdapter(pt.PrefixSharing, Plugin):
    name = "mam_adapter"
    description = "Prefix tuning on attention + scaled parallel adapter on the FFN (Mix-And-Match)"
    paper = "He et al., Towards a Unified View of Parameter-Efficient Transfer Learning, ICLR 2022"
    kinds = ("kv_prefix", "parallel")
    recipe = Recipe(lr=1e-4, source=(
        "He et al. train at 5e-5..1e-4 (their prefix through its MLP); on MiniLM in 100 steps 1e-4..1e-3 stay"
        " at the majority class (python -m bench --only recipes)"))
    identity_at_init = False  # the prefix part changes attention from the start; the adapter part does not

    def __init__(self, prefix_length: int = 30, mlp_hidden: int = 800, bottleneck: int = 512,
                 scaling: float = 4.0, max_length: int = 256) -> None:
        self.prefix_length = prefix_length
        self.mlp_hidden = mlp_hidden
        self.bottleneck = bottleneck
        self.scaling = scaling
        self.max_length = max_length

    def sites(self, graph: Any) -> list[Site]:
        return attention_sites(graph, "kv_prefix") + sublayer_sites(graph, "parallel", ("ffn",))

    def dims(self, site: Site) -> dict[str, Dim]:
        if site.kind == "kv_prefix":
            return pt.prefix_dims(site, self.prefix_length, self.mlp_hidden, self.max_length)
        high = max(1, site.in_features)  # the bottleneck is capped by the hidden size
        return {
            "bottleneck": IntDim("bottleneck", default=min(self.bottleneck, high), low=1, high=high, log=True,
                                 help="width of the FFN adapter's down-projection"),
            "activation": ChoiceDim("activation", default="relu", choices=tuple(ACTIVATIONS),
                                    help="non-linearity between down and up"),
            "scaling": FloatDim("scaling", default=self.scaling, low=0.1, high=16.0, log=True,
                                help="scale s of the parallel adapter's output"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        if site.kind == "kv_prefix":
            return pt.prefix_count(site, cfg)
        return bottleneck_count(site.in_features, cfg["bottleneck"], site.out_features)

    def build(self, site: Site, cfg: dict[str, Any]) -> PETLModule:
        if site.kind == "kv_prefix":
            return pt.build_prefix(self, site, cfg)
        return ParallelAdapterModule(site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        if site.kind == "kv_prefix":
            return pt.prefix_activations(site, cfg, shape)
        return shape.tokens * (site.in_features + 2 * cfg["bottleneck"])
