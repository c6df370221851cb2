"""Sums of Kronecker products, sum_i A_i kron B_i, with B_i = s_i t_i low-rank (Karimi Mahabadi et al.,
Compacter; He et al., KAdaptation): the products, the shared slow weights A and the factors' initialisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i kron(a_i, b_i): a (n, p, q), b (n, r, s) -> (p r, q s), without n separate krons."""
    n, p, q = a.shape
    _, r, s = b.shape
    return torch.einsum("ipq,irs->prqs", a, b.to(a.dtype)).reshape(p * r, q * s)


class SlowWeights(nn.Module):
    """The shared slow weights A_1..A_n, (n, n, n), N(0, 1/n) so that sum_i A_i kron B_i keeps
    the scale of the B_i."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))


def low_rank_factors(n: int, rows: int, cols: int, rank: int, var: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s (n, rows, r) and t (n, r, cols) with Var(s_i t_i) = var (entries of equal std)."""
    std = (var / rank) ** 0.25
    return torch.randn(n, rows, rank) * std, torch.randn(n, rank, cols) * std


