"""S3PET's gate arithmetic: the shifted global sigmoid, the stretched gates, the discretisation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

from petlsearch.errors import BudgetError
from petlsearch.plugins import create_plugins
from petlsearch.runners.trainer import TrainConfig
from petlsearch.searchspace.budget import Budget
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.space import SearchSpace
from petlsearch.strategies.arms import expand_arms
from petlsearch.strategies.base import SearchContext
from petlsearch.strategies.gates import (
    beta_at,
    greedy_fill,
    mean_gates,
    sample_gates,
    shift_logits,
    solve_shift,
    warm_at,
)
from petlsearch.strategies.s3pet import S3PETSearch

costs_st = st.lists(st.integers(1, 10**6), min_size=1, max_size=60)


def expected_cost(alphas, costs, b, beta):
    return float(np.asarray(costs, float) @ expit((np.asarray(alphas, float) - b) / beta))


# ---------------------------------------------------------------------- shifted global sigmoid
@settings(max_examples=200, deadline=None)
@given(costs=costs_st, data=st.data(), beta=st.floats(0.01, 5.0), frac=st.floats(1e-4, 0.9999))
def test_shift_meets_the_budget(costs, data, beta, frac):
    alphas = data.draw(st.lists(st.floats(-20, 20), min_size=len(costs), max_size=len(costs)))
    budget = frac * sum(costs)
    b = solve_shift(alphas, costs, budget, beta)
    assert b is not None
    assert expected_cost(alphas, costs, b, beta) == pytest.approx(budget, rel=1e-6)


def test_shift_falls_as_the_budget_grows_and_is_none_when_everything_fits():
    rng = np.random.default_rng(0)
    alphas, costs = rng.normal(size=20), rng.integers(1, 100, size=20)
    shifts = [solve_shift(alphas, costs, f * costs.sum(), 0.5) for f in (0.1, 0.3, 0.6, 0.9)]
    assert shifts == sorted(shifts, reverse=True)
    assert solve_shift(alphas, costs, costs.sum(), 0.5) is None
    x = shift_logits(torch.tensor(alphas), torch.tensor(costs, dtype=torch.float64), None, 0.5)
    assert torch.all(torch.sigmoid(x) == 1)


def test_shift_rejects_an_empty_budget():
    with pytest.raises(BudgetError):
        solve_shift([0.0, 1.0], [10, 10], 0, 1.0)


def test_equal_alphas_give_equal_probabilities():
    costs = [10, 20, 30, 40]
    b = solve_shift([0.0] * 4, costs, 25, 1.0)
    assert expit(-b) == pytest.approx(25 / 100, rel=1e-9)


def test_implicit_shift_keeps_the_expected_cost_to_first_order():
    """With b differentiated through the budget equation, d(sum n_i p_i)/d alpha = 0; with b
    constant (the authors' code) it is not."""
    rng = np.random.default_rng(1)
    costs = torch.tensor(rng.integers(1, 1000, size=12), dtype=torch.float64)
    alpha = torch.tensor(rng.normal(size=12), dtype=torch.float64, requires_grad=True)
    b = solve_shift(alpha.detach().numpy(), costs.numpy(), 0.3 * float(costs.sum()), 0.7)
    for implicit, small in ((True, True), (False, False)):
        x = shift_logits(alpha, costs, b, 0.7, implicit=implicit)
        (grad,) = torch.autograd.grad(costs @ torch.sigmoid(x), alpha)
        assert bool(grad.abs().max() < 1e-9 * float(costs.sum())) is small
    x = shift_logits(alpha, costs, b, 0.7)  # the value does not depend on `implicit`
    assert torch.allclose(x, (alpha - b) / 0.7)


def test_warmup_schedule():
    assert [warm_at(0.5, s, 10) for s in (0, 1, 5, 9)] == [1.0, pytest.approx(0.8), 0.0, 0.0]
    assert warm_at(0.0, 0, 10) == 0.0  # no warm-up: the budget from the first step


def test_beta_schedule():
    assert beta_at(0.5, 7, 10) == 0.5
    assert beta_at((1.0, 0.1), 0, 11) == 1.0
    assert beta_at((1.0, 0.1), 10, 11) == pytest.approx(0.1)
    assert beta_at((1.0, 0.1), 5, 11) == pytest.approx(math.sqrt(0.1))
    assert beta_at((1.0, 0.1), 50, 11) == pytest.approx(0.1)


# ---------------------------------------------------------------------- gates
def test_hard_concrete_hits_exact_zero_and_one_with_the_stretch():
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(20000, dtype=torch.float64)
    z = sample_gates(logits, "hard_concrete", (-0.1, 1.1), g)
    assert z.min() == 0 and z.max() == 1
    # P(z = 1) = P(s >= (1 - l) / (r - l)) = sigmoid(logit p - logit(11 / 12)) = 1 / 12 at p = 1/2
    assert float((z == 1).double().mean()) == pytest.approx(1 / 12, abs=0.01)
    assert float((z == 0).double().mean()) == pytest.approx(1 / 12, abs=0.01)
    plain = sample_gates(logits, "hard_concrete", (0.0, 1.0), torch.Generator().manual_seed(0))
    assert bool(((plain > 0) & (plain < 1)).all())  # without the stretch nothing is exactly 0 or 1


def test_gates_follow_the_probability_and_carry_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.full((5000,), 2.0, dtype=torch.float64, requires_grad=True)
    z = sample_gates(x, "hard_concrete", (-0.1, 1.1), g)
    assert float((z > 0.5).double().mean()) == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))), abs=0.02)
    z.sum().backward()
    assert x.grad.abs().sum() > 0


def test_straight_through_gates_are_binary_with_a_gradient():
    x = torch.linspace(-3, 3, 200, dtype=torch.float64, requires_grad=True)
    z = sample_gates(x, "straight_through", (-0.1, 1.1), torch.Generator().manual_seed(2))
    assert set(z.detach().tolist()) <= {0.0, 1.0}
    z.sum().backward()
    assert x.grad.abs().sum() > 0


def test_expected_gates_are_the_deterministic_ones():
    x = torch.linspace(-4, 4, 9)
    assert torch.equal(sample_gates(x, "expected"), mean_gates(x))
    assert mean_gates(torch.tensor([-50.0, 50.0])).tolist() == [0.0, 1.0]


def test_all_closed_gates_keep_the_most_probable_one():
    x = torch.tensor([-60.0, -40.0, -50.0], requires_grad=True)
    z = sample_gates(x, "hard_concrete", (-0.1, 1.1), torch.Generator().manual_seed(0))
    assert z[1] > 0 and z[0] == 0 and z[2] == 0
    z.sum().backward()
    assert x.grad[1] != 0


def test_unknown_gate_type():
    with pytest.raises(ValueError, match="hard_concrete"):
        sample_gates(torch.zeros(2), "bernoulli")


# ---------------------------------------------------------------------- discretisation
@settings(max_examples=200, deadline=None)
@given(costs=costs_st, data=st.data(), frac=st.floats(0.0, 1.2))
def test_greedy_fill_never_exceeds_the_budget_and_is_maximal(costs, data, frac):
    alphas = data.draw(st.lists(st.floats(-5, 5), min_size=len(costs), max_size=len(costs)))
    budget = frac * sum(costs)
    order = sorted(range(len(costs)), key=lambda i: -alphas[i])
    chosen = greedy_fill(order, lambda idx: sum(costs[i] for i in idx) <= budget)
    used = sum(costs[i] for i in chosen)
    assert used <= budget
    assert all(used + costs[i] > budget for i in set(range(len(costs))) - set(chosen))
    best = [i for i in order if costs[i] <= budget][:1]
    assert chosen[:1] == best  # the best candidate that fits alone comes first


def test_greedy_fill_takes_one_per_key():
    chosen = greedy_fill([0, 1, 2, 3], lambda idx: True, key=lambda i: i // 2)
    assert chosen == [0, 2]


_SPACES: dict[str, tuple[SearchSpace, list]] = {}
FAMILIES = ("bert", "gpt2", "t5", "vit")
PLUGINS = ("lora", "adapter", "parallel_adapter", "bitfit", "ia3", "compacter")


def _space(family: str) -> SearchSpace:
    if family not in _SPACES:
        from petlsearch.plugins import _tiny

        graph = ModelGraph.from_model(getattr(_tiny, family)())
        _SPACES[family] = SearchSpace.from_graph(graph, create_plugins(PLUGINS))
    return _SPACES[family]


@settings(max_examples=40, deadline=None)
@given(family=st.sampled_from(FAMILIES), frac=st.floats(0.01, 1.1), seed=st.integers(0, 10**6),
       sizes=st.sampled_from((1, 3, "auto")))
def test_discretised_structures_of_real_spaces_fit(family, frac, seed, sizes):
    space = _space(family)
    total = sum(c.min_cost for c in space.candidates)
    cheapest = min(c.min_cost for c in space.candidates)
    budget = Budget(params=max(cheapest, int(frac * total)))
    ctx = SearchContext(space, budget, None, TrainConfig())
    arms = expand_arms(space, budget, ctx.shape, sizes)
    rng = random.Random(seed)
    scores = [rng.random() for _ in arms]
    chosen = S3PETSearch.discretise(ctx, arms, scores)
    placements = [arms[i].placement for i in chosen]
    assert space.count(placements) <= budget.params
    ctx.check_fits(placements)
    assert len({p.key for p in placements}) == len(placements)


def test_discretisation_under_a_memory_budget_fits():
    space = _space("bert")
    shape = BatchShape(8, 16)
    base = space.memory([], shape)
    one = space.memory([space.candidates[0].placement(space.candidates[0].min_config)], shape)
    budget = Budget(memory=base + 3 * (one - base))
    ctx = SearchContext(space, budget, None, TrainConfig(), shape=shape)
    arms = expand_arms(space, budget, shape, 1)
    chosen = S3PETSearch.discretise(ctx, arms, [random.Random(i).random() for i in range(len(arms))])
    placements = [arms[i].placement for i in chosen]
    assert placements and space.memory(placements, shape) <= budget.memory
