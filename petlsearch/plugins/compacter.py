"""Compacter and Compacter++: adapters whose projections are low-rank PHM layers (Karimi Mahabadi
et al., "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", NeurIPS 2021).

Each projection (in -> out) of a bottleneck adapter has the weight W = sum_i A_i kron B_i
(i = 1..n), with A_i (n x n) "slow" weights shared by every adapter layer of the model (counted
once: n^3 parameters, through the plugin's shared hooks) and B_i = s_i t_i (out/n x r)(r x in/n)
"fast" low-rank weights of each layer. An adapter of width b on features d costs
2 r (d + b) + b + d trainable parameters plus the shared n^3. Compacter places one adapter after
the attention and one after the FFN sublayer (Houlsby placement); Compacter++ only after the FFN.
The up projection's t_i start at zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import SequentialDelta
from petlsearch.plugins.parts.bottleneck import ACTIVATIONS
from petlsearch.plugins.parts.kronecker import SlowWeights, kron_sum, low_rank_factors
from petlsearch.searchspace.dims import ChoiceDim, Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, sublayer_sites


class PHMLinear(nn.Module):
    """x -> x W^T + bias, W = sum_i A_i kron (s_i t_i): (..., fin) -> (..., fout). The slow weights
    A come in at call time, so that they stay owned by the placement's `shared_*` child."""

    def __init__(self, n: int, fin: int, fout: int, rank: int, zero: bool = False) -> None:
        super().__init__()
        s, t = low_rank_factors(n, fout // n, fin // n, rank, 2.0 / (fin + fout))  # Glorot variance
        self.s = nn.Parameter(s)  # (n, fout/n, r)
        self.t = nn.Parameter(torch.zeros_like(t) if zero else t)  # (n, r, fin/n)
        self.bias = nn.Parameter(torch.zeros(fout))

    def weight(self, a: torch.Tensor) -> torch.Tensor:
        return kron_sum(a, self.s @ self.t)  # (fout, fin)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(a), self.bias)


def phm_count(fin: int, fout: int, rank: int) -> int:
    """Fast weights and bias of one PHM layer: n r (fout/n + fin/n) + fout."""
    return rank * (fin + fout) + fout


class CompacterAdapter(SequentialDelta):
    """h -> h + up(act(down(h))) with PHM down (d -> b) and up (b -> d) layers."""

    def __init__(self, site: Site, cfg: dict[str, Any], slow: SlowWeights) -> None:
        super().__init__(site)
        n, d, b, r = cfg["n"], site.out_features, cfg["bottleneck"], cfg["rank"]
        self.shared_slow = slow  # a `shared_*` child: counted once by the plugin, not per placement
        self.down = PHMLinear(n, d, b, r)
        self.act = ACTIVATIONS[cfg["activation"]]()
        self.up = PHMLinear(n, b, d, r, zero=True)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        a = self.shared_slow.A
        return self.up(self.act(self.down(h, a)), a)


def _lcm(values: tuple[int, ...]) -> int:
    return reduce(lambda x, y: x * y // math.gcd(x, y), values, 1)


class Compacter(Plugin):
    name = "compacter"
    description = "Adapters with low-rank PHM (Kronecker) projections; slow weights shared by all layers"
    paper = "Karimi Mahabadi et al., Compacter: Efficient Low-Rank Hypercomplex Adapter Layers, NeurIPS 2021"
    kinds = ("sequential",)
    recipe = Recipe(lr=3e-3, source=(
        "Karimi Mahabadi et al.: 3e-3; swept 1e-3..3e-2 on MiniLM, 100 steps, seed 0: 3e-3 best (python -m "
        "bench --only recipes)"))
    sublayers: tuple[str, ...] = ("attn", "xattn", "ffn")

    def __init__(self, n_choices: tuple[int, ...] = (2, 4, 8, 12), max_bottleneck: int = 256,
                 max_rank: int = 4, reduction: int = 32) -> None:
        self.n_choices = n_choices
        self.max_bottleneck = max_bottleneck
        self.max_rank = max_rank
        self.reduction = reduction

    def _ns(self, d: int) -> tuple[int, ...]:
        return tuple(n for n in self.n_choices if d % n == 0)

    def sites(self, graph: Any) -> list[Site]:
        return [s for s in sublayer_sites(graph, self.kinds[0], self.sublayers) if self._ns(s.out_features)]

    def bottlenecks(self, d: int) -> tuple[int, ...]:
        """Widths divisible by every offered n (so any n choice is valid): lcm x 2^k, <= d."""
        step = _lcm(self._ns(d))
        cap = max(step, min(self.max_bottleneck, d))
        return tuple(step * 2 ** k for k in range(int(math.log2(cap // step)) + 1))

    def dims(self, site: Site) -> dict[str, Dim]:
        d = site.out_features
        ns, widths = self._ns(d), self.bottlenecks(d)
        default_width = min(widths, key=lambda w: abs(w - d / self.reduction))
        return {
            "n": ChoiceDim("n", default=4 if 4 in ns else ns[0], choices=ns,
                           help="number of Kronecker products (A_i are n x n); divides d and the width"),
            "bottleneck": ChoiceDim("bottleneck", default=default_width, choices=widths,
                                    help="adapter width (a multiple of every n choice)"),
            "rank": IntDim("rank", default=1, low=1, high=self.max_rank, help="rank r of the fast weights s_i t_i"),
            "activation": ChoiceDim("activation", default="gelu", choices=tuple(ACTIVATIONS),
                                    help="non-linearity between down and up"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        d, b, r = site.out_features, cfg["bottleneck"], cfg["rank"]
        return phm_count(d, b, r) + phm_count(b, d, r)

    def shared_key(self, site: Site, cfg: dict[str, Any]) -> Any:
        return ("phm_slow_weights", cfg["n"])

    def shared_count(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["n"] ** 3

    def build(self, site: Site, cfg: dict[str, Any]) -> CompacterAdapter:
        n = cfg["n"]
        slow = self.shared(self.shared_key(site, cfg), lambda: SlowWeights(n))
        return CompacterAdapter(site, cfg, slow)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        # the adapter's input (the sublayer output), the bottleneck before and after the activation
        return shape.tokens * (site.out_features + 2 * cfg["bottleneck"])


class CompacterPlusPlus(Compacter):
    name = "compacter_pp"
    description = "Compacter with one adapter per block, after the FFN only"
    recipe = Recipe(lr=3e-3, source="Karimi Mahabadi et al.: 3e-3, as Compacter")
    sublayers = ("ffn",)
