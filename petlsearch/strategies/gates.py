"""The arithmetic of S3PET's structure gates, after "Sparse Structure Search for Parameter-Efficient
Tuning" (Hu et al., NeurIPS 2022): the shifted global sigmoid that meets the budget, the stretched
Gumbel-sigmoid (hard-concrete) gates, the temperature schedule and the greedy discretisation.

Candidate i has a structural parameter alpha_i and a cost n_i. Its keep probability is
p_i = sigmoid((alpha_i - b) / beta), with the one global shift b chosen so that the expected cost
sum_i n_i p_i equals the budget; beta is annealed towards 0 so that the p_i become nearly binary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np
import torch
from scipy.special import expit

from petlsearch.errors import BudgetError

GATE_TYPES = ("hard_concrete", "straight_through", "expected")
STRETCH = (-0.1, 1.1)  # (l, r) of Louizos et al.'s hard-concrete, which S3PET adopts
_MAX_DOUBLINGS = 2100  # enough to reach any float64 from any other


def solve_shift(alphas: Sequence[float], costs: Sequence[float], budget: float, beta: float) -> float | None:
    """The shift b with sum_i costs_i * sigmoid((alphas_i - b) / beta) = budget.

    The sum falls monotonically from sum(costs) (b -> -inf) to 0 (b -> +inf), so bisection on a
    bracket finds b to machine precision (until the midpoint equals an end). Returns None when
    everything fits (sum(costs) <= budget): every probability is then 1.
    """
    a = np.asarray(alphas, dtype=np.float64)
    n = np.asarray(costs, dtype=np.float64)
    if not budget > 0:
        raise BudgetError(f"S3PET needs a positive budget for the shifted sigmoid, got {budget!r}")
    if beta <= 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive temperature, got {beta!r}")
    if a.size == 0 or n.sum() <= budget:
        return None

    def excess(b: float) -> float:  # expected cost minus budget; decreasing in b
        return float(n @ expit((a - b) / beta)) - budget

    lo, hi = _bracket(excess, float(a.min()), float(a.max()), beta)
    while True:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return lo if abs(excess(lo)) <= abs(excess(hi)) else hi


def _bracket(excess: Callable[[float], float], a_min: float, a_max: float, beta: float) -> tuple[float, float]:
    """(lo, hi) with excess(lo) >= 0 >= excess(hi), widening by doubling."""
    width = beta
    lo, hi = a_min - width, a_max + width
    for _ in range(_MAX_DOUBLINGS):
        if excess(lo) >= 0:
            break
        width *= 2
        lo = a_min - width
    width = beta
    for _ in range(_MAX_DOUBLINGS):
        if excess(hi) <= 0:
            break
        width *= 2
        hi = a_max + width
    return lo, hi


def shift_logits(alpha: torch.Tensor, costs: torch.Tensor, b: float | None, beta: float,
                 implicit: bool = True) -> torch.Tensor:
    """The logits x_i = (alpha_i - b) / beta of the keep probabilities p = sigmoid(x), for the shift
    `b` that `solve_shift` found at the current alpha (None: everything fits, x = +inf).

    With `implicit`, b is differentiated as a function of alpha (implicit function theorem on the
    budget equation: db/dalpha_i = n_i p_i (1 - p_i) / sum_j n_j p_j (1 - p_j)), so that a gradient
    step on alpha moves probability between candidates without changing the expected cost to first
    order. Without it b is a constant, as in the authors' code.
    """
    if b is None:
        return torch.full_like(alpha, math.inf)
    x = (alpha - b) / beta
    if implicit:
        with torch.no_grad():
            p = torch.sigmoid(x.double())
            w = costs.to(device=p.device, dtype=p.dtype) * p * (1 - p)  # (N,)
            w = w / w.sum() if w.sum() > 0 else torch.zeros_like(w)
        shift = (w.to(alpha.dtype) * (alpha - alpha.detach())).sum()  # value 0, gradient db/dalpha
        x = x - shift / beta
    return x


def sample_gates(logits: torch.Tensor, kind: str = "hard_concrete", stretch: tuple[float, float] = STRETCH,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic gates z in [0, 1] for keep logits `logits` (N,).

    hard_concrete: s = sigmoid(logit p + log u - log(1 - u)) with u ~ U(0, 1) (a Gumbel-sigmoid
    sample, P(s > 1/2) = p), stretched to (l, r) and clamped to [0, 1], so that z is exactly 0 or 1
    with positive probability. straight_through: the value is 1[s > 1/2], the gradient that of the
    clamped sample (the authors' `hard_forward`). expected: no noise, the deterministic gates.
    If every gate came out 0, the most probable candidate gets gate p (as the authors' code), so
    that the step still has a gradient.
    """
    if kind not in GATE_TYPES:
        raise ValueError(f"unknown gate type {kind!r}; choose one of {', '.join(GATE_TYPES)}")
    if kind == "expected":
        return mean_gates(logits, stretch)
    low, high = stretch
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    u = u.clamp(tiny, 1 - torch.finfo(logits.dtype).eps)
    s = torch.sigmoid(logits + torch.log(u) - torch.log1p(-u))
    z = (s * (high - low) + low).clamp(0.0, 1.0)
    if kind == "straight_through":
        hard = (s > 0.5).to(z.dtype)
        z = hard + (z - z.detach())  # value exactly `hard`
    if logits.numel() and not bool((z.detach() > 0).any()):
        best = int(torch.argmax(logits.detach()))
        onehot = torch.zeros_like(z)
        onehot[best] = 1.0
        z = z + onehot * torch.sigmoid(logits)
    return z


def mean_gates(logits: torch.Tensor, stretch: tuple[float, float] = STRETCH) -> torch.Tensor:
    """Deterministic gates for evaluation: the stretched mean probability, clamped to [0, 1]."""
    low, high = stretch
    return (torch.sigmoid(logits) * (high - low) + low).clamp(0.0, 1.0)


def beta_at(schedule: float | Sequence[float], step: int, total: int) -> float:
    """The temperature at `step` of `total`: a constant, or (start, end) annealed geometrically."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    start, end = (float(v) for v in schedule)
    frac = min(1.0, max(0.0, step / max(1, total - 1)))
    return start * (end / start) ** frac


def warm_at(fraction: float, step: int, total: int) -> float:
    """The budget warm-up left at `step` of `total`: 1 at step 0, falling linearly to 0 at
    `fraction` of the steps (the relaxation start ** warm is thus geometric); 0 without warm-up."""
    if fraction <= 0:
        return 0.0
    return max(0.0, 1.0 - step / (fraction * total))


def greedy_fill(order: Iterable[int], fits: Callable[[list[int]], bool],
                key: Callable[[int], Hashable] | None = None) -> list[int]:
    """Indices taken in `order` (best first) while the structure still fits; an index whose `key`
    is already taken (another size of the same site and plugin) is skipped. The result always fits
    when `fits([])` does, because an index is only added after `fits` accepted the larger set."""
    chosen: list[int] = []
    taken: set[Hashable] = set()
    for i in order:
        k = key(i) if key is not None else i
        if k in taken:
            continue
        if fits([*chosen, i]):
            chosen.append(i)
            taken.add(k)
    return chosen
