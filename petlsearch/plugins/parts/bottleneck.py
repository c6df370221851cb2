"""The bottleneck that adapters share: down (d -> b), a non-linearity, up (b -> d) starting at zero,
as a sequential or a parallel module, and the plugin base of the bottleneck adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import ParallelDelta, SequentialDelta
from petlsearch.searchspace.dims import ChoiceDim, Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.sites import Site, sublayer_sites

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


class BottleneckPlugin(Plugin):
    """Sites, dims, counts and modules of a bottleneck adapter on the sublayers' outputs; a subclass
    names the method, its kinds and recipe (and `module_class` / `input_features` for parallel ones)."""

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
