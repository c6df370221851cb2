"""Bottleneck adapters: Houlsby (sequential) and the unified view's parallel / scaled parallel adapter.

Houlsby et al. insert h -> h + up(act(down(h))) after the attention and FFN sublayers; He et al.
("Towards a Unified View of Parameter-Efficient Transfer Learning") show that the same bottleneck
placed in parallel to a sublayer (out = f(x) + s * up(act(down(x)))) with a scale s works better,
especially on the FFN. The up-projection starts at zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.plugins.base import BatchShape, ParallelDelta, Plugin, SequentialDelta, Site
from petlsearch.searchspace.dims import ChoiceDim, Dim, FloatDim, IntDim
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import sublayer_sites

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """s * up(act(down(x))): (..., in) -> (..., out), with `up` zero-initialised."""

    def __init__(self, fin: int, bottleneck: int, fout: int, activation: str, scaling: float = 1.0) -> None:
        super().__init__()
        self.down = nn.Linear(fin, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, fout)
        self.scaling = scaling
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(x)))
        return out if self.scaling == 1.0 else out * self.scaling


def bottleneck_count(fin: int, bottleneck: int, fout: int) -> int:
    return fin * bottleneck + bottleneck + bottleneck * fout + fout


class SequentialAdapter(SequentialDelta):
    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        super().__init__(site)
        self.adapter = Bottleneck(site.out_features, cfg["bottleneck"], site.out_features,
                                  cfg["activation"], cfg.get("scaling", 1.0))

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter(h)


class ParallelAdapterModule(ParallelDelta):
    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        super().__init__(site)
        self.adapter = Bottleneck(site.in_features, cfg["bottleneck"], site.out_features,
                                  cfg["activation"], cfg.get("scaling", 1.0))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)


class HoulsbyAdapter(Plugin):
    name = "adapter"
    description = "Bottleneck adapter after the attention and FFN sublayers (sequential)"
    paper = "Houlsby et al., Parameter-Efficient Transfer Learning for NLP, ICML 2019"
    kinds = ("sequential",)
    recipe = Recipe(lr=1e-3, source=(
        "Houlsby et al. tune 3e-5..3e-3; 1e-3 at every site of MiniLM, 100 steps: 0.717 test accuracy over 3 "
        "seeds, where 1e-2 stayed at the majority class (python -m bench --only zoo)"))
    module_class: type[nn.Module] = SequentialAdapter

    def __init__(self, sublayers: tuple[str, ...] = ("attn", "xattn", "ffn"), max_bottleneck: int = 256) -> None:
        self.sublayers = sublayers
        self.max_bottleneck = max_bottleneck

    def sites(self, graph: Any) -> list[Site]:
        return sublayer_sites(graph, self.kinds[0], self.sublayers)

    def dims(self, site: Site) -> dict[str, Dim]:
        high = max(1, min(self.max_bottleneck, site.out_features))
        return {
            "bottleneck": IntDim("bottleneck", default=min(16, high), low=1, high=high, log=True,
                                 help="width of the down-projection"),
            "activation": ChoiceDim("activation", default="relu", choices=tuple(ACTIVATIONS),
                                    help="non-linearity between down and up"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return bottleneck_count(self.input_features(site), cfg["bottleneck"], site.out_features)

    @staticmethod
    def input_features(site: Site) -> int:
        """A sequential adapter reads the sublayer's output."""
        return site.out_features

    def build(self, site: Site, cfg: dict[str, Any]) -> nn.Module:
        return self.module_class(site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        # input of down (shared with the sublayer's output for sequential), the bottleneck pre- and
        # post-activation
        return shape.tokens * (site.out_features + 2 * cfg["bottleneck"])


class ParallelAdapter(HoulsbyAdapter):
    name = "parallel_adapter"
    description = "Bottleneck adapter in parallel to a sublayer, output scaled by s (unified view)"
    paper = "He et al., Towards a Unified View of Parameter-Efficient Transfer Learning, ICLR 2022"
    kinds = ("parallel",)
    recipe = Recipe(lr=1e-3, source=(
        "as Houlsby adapters: 1e-3 at every site of MiniLM, 100 steps (python -m bench --only zoo); He et al."
        " use 1e-4..5e-4 over epochs"))
    module_class = ParallelAdapterModule

    @staticmethod
    def input_features(site: Site) -> int:
        """A parallel adapter reads the sublayer's input."""
        return site.in_features

    def dims(self, site: Site) -> dict[str, Dim]:
        dims = super().dims(site)
        dims["scaling"] = FloatDim("scaling", default=4.0, low=0.1, high=16.0, log=True,
                                   help="scale s of the branch's output (1 = unscaled parallel adapter)")
        return dims
