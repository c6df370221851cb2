"""S3PET's supernet, after "Sparse Structure Search for Parameter-Efficient Tuning" (Hu et al.,
NeurIPS 2022): every candidate of a search space attached at once to one model, at fixed sizes,
each gated by the keep probability of its structural parameter alpha_i (see gates.py), plus the
budget equations and the split of the training data that the bi-level search needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from petlsearch.errors import BudgetError, PetlsearchError, PluginError
from petlsearch.searchspace.bound import Bound, attach
from petlsearch.strategies.arms import SPACE_RATIO, Arm, expand_arms
from petlsearch.strategies.gates import mean_gates, sample_gates, shift_logits, solve_shift

if TYPE_CHECKING:
    from torch import nn

    from petlsearch.runners.tasks import Task
    from petlsearch.runners.trainer import ParamGroup, TrainConfig
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.recipe import Recipe
    from petlsearch.searchspace.bound import Applied
    from petlsearch.strategies.base import SearchContext, Training


@dataclass
class Constraint:
    """sum_i costs_i p_i = budget for one budget (parameters, or bytes of training memory)."""

    unit: str
    costs: torch.Tensor  # (N,) float64 on the CPU
    budget: float
    start: float = 1.0  # the budget's relaxation at the start of a warm-up (see Supernet.warm)

    def limit(self, warm: float) -> float:
        """The budget the gates meet at warm-up progress `warm` (1: start, 0: the budget itself)."""
        return self.budget * self.start ** warm


class Supernet:
    """Every arm attached at once to one model; a forward pre-hook sets every gate before each
    forward (sampled in training mode, deterministic in eval mode), so a training step costs one
    forward and backward of the model with all modules installed: nothing is rebuilt per step."""

    def __init__(self, model: nn.Module, graph: ModelGraph, arms: list[Arm], constraints: list[Constraint],
                 device: torch.device, gate: str, stretch: tuple[float, float], implicit: bool, seed: int,
                 recipes: dict[str, Recipe] | None = None, training: Training | None = None) -> None:
        self.model, self.graph, self.arms, self.constraints = model, graph, arms, constraints
        self.training = training  # the runner's trial interface: parameter groups like a trial's
        self.recipes = recipes or {}  # plugin name -> how its arms train
        self.device, self.gate, self.stretch, self.implicit = device, gate, stretch, implicit
        self.alpha = torch.zeros(len(arms), device=device, requires_grad=True)  # as the authors: all equal
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.beta = 1.0
        self.warm = 0.0  # budget warm-up left: 1 meets every constraint's relaxed start, 0 the budget
        self.arch_grad = False  # gates carry alpha's gradient (alpha steps only)
        self.fixed: list[float] | None = None  # gates pinned to these values (tests, ablations)
        self.last_loss: torch.Tensor | None = None
        self.last_gates: list[float] = []
        self._cache: tuple[Any, tuple[float | None, Constraint | None]] | None = None
        self._replay: torch.Tensor | None = None
        self._head: list[nn.Parameter] = []
        self._rates: dict[int, float] = {}
        self._handles = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.arms]

    @property
    def unit(self) -> str:
        return "+".join(c.unit for c in self.constraints) or "none"

    def describe_budget(self) -> str:
        parts = [f"sum {c.unit} {float(c.costs.sum()):,.0f} for a budget of {c.budget:,.0f}" for c in self.constraints]
        return "; ".join(parts) or "no limit"

    def set_beta(self, beta: float) -> None:
        self.beta = float(beta)

    def set_warm(self, warm: float) -> None:
        self.warm = min(1.0, max(0.0, float(warm)))

    # ------------------------------------------------------------------ probabilities
    def shift(self) -> tuple[float | None, Constraint | None]:
        """The shift b of the binding budget (the largest b satisfies every budget), cached until
        alpha, beta or the warm-up change."""
        key = (self.alpha._version, self.beta, self.warm)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        a = self.alpha.detach().double().cpu().numpy()
        best: tuple[float | None, Constraint | None] = (None, None)
        for c in self.constraints:
            b = solve_shift(a, c.costs.numpy(), c.limit(self.warm), self.beta)
            if b is not None and (best[0] is None or b > best[0]):
                best = (b, c)
        self._cache = (key, best)
        return best

    def logits(self) -> torch.Tensor:
        b, c = self.shift()
        costs = c.costs if c is not None else torch.zeros(len(self.arms), dtype=torch.float64)
        return shift_logits(self.alpha, costs, b, self.beta, self.implicit)

    def probabilities(self) -> list[float]:
        with torch.no_grad():
            return torch.sigmoid(self.logits()).cpu().tolist()

    def mean_gates(self) -> list[float]:
        with torch.no_grad():
            return mean_gates(self.logits(), self.stretch).cpu().tolist()

    def expected_use(self) -> float:
        """sum_i n_i p_i / budget of the binding budget (1 by construction after the warm-up, unless
        all fits)."""
        c = self.shift()[1] or (self.constraints[0] if self.constraints else None)
        return float(c.costs @ torch.tensor(self.probabilities(), dtype=torch.float64)) / c.budget if c else 0.0

    def sampled_use(self) -> tuple[float, float]:
        """The last weight step's gates, over the budget: (sum_i n_i z_i, the cost of the modules
        whose gate was not exactly 0). The hard-concrete keeps more modules partly open than the
        budget holds, so the second is above 1 early in the search and falls as beta anneals."""
        c = self.shift()[1] or (self.constraints[0] if self.constraints else None)
        if c is None or not self.last_gates:
            return 0.0, 0.0
        z = torch.tensor(self.last_gates, dtype=torch.float64)
        return float(c.costs @ z) / c.budget, float(c.costs @ (z > 0).double()) / c.budget

    # ------------------------------------------------------------------ gates
    def _before(self, _model: nn.Module, _args: tuple) -> None:
        if self.fixed is not None:
            self._set(list(self.fixed), None)
        elif not self.model.training:
            self._set(self.mean_gates(), None)
        else:
            if self._replay is not None:
                self.generator.set_state(self._replay)
            with torch.set_grad_enabled(self.arch_grad):
                z = sample_gates(self.logits(), self.gate, self.stretch, self.generator)
            values = z.detach().cpu().tolist()
            if not self.arch_grad:
                self.last_gates = values
            self._set(values, z if self.arch_grad else None)

    def _set(self, values: list[float], z: torch.Tensor | None) -> None:
        """Python floats where no gradient is needed (a gate of exactly 0 or 1 is clamped: its
        gradient is 0), so gated-off modules are skipped and gate-1 modules take the fast path."""
        parts = z.unbind() if z is not None else None
        for i, (arm, v) in enumerate(zip(self.arms, values)):
            if parts is not None and (self.gate == "straight_through" or 0.0 < v < 1.0):
                arm.module.gate = parts[i]
            else:
                arm.module.gate = float(v)

    def _after(self, _model: nn.Module, _args: tuple, out: Any) -> None:
        loss = getattr(out, "loss", None)
        if self.model.training and not self.arch_grad and loss is not None:
            self.last_loss = loss.detach()

    @contextlib.contextmanager
    def same_noise(self) -> Iterator[None]:
        """Every forward inside draws the same gate noise u (one sample per unrolled step)."""
        self._replay = self.generator.get_state()
        try:
            yield
        finally:
            self._replay = None

    # ------------------------------------------------------------------ parameters
    def groups(self, cfg: TrainConfig, new_head: bool = True) -> list[ParamGroup]:
        """The trainer's parameter groups: each plugin's arms at its recipe's rate, and the head
        unless frozen. Remembers each weight's rate for the unrolled step (`rates`)."""
        groups = self.training.groups(self.model, self.graph, self._applied().parameters_by_plugin(), self.recipes,
                                      cfg, new_head)
        self._head = next(g.params for g in groups if g.name == "head")
        self._rates = {id(p): g.lr for g in groups for p in g.params}
        return groups

    def _applied(self) -> Applied:
        """The arms as an Applied structure: its parameters, each once, grouped by plugin."""
        from petlsearch.searchspace.bound import Applied

        return Applied([(a.placement, a.module) for a in self.arms])

    def module_parameters(self) -> list[nn.Parameter]:
        return self._applied().parameters()

    def rates(self) -> list[float]:
        """The learning rate of each of `weights()` (set by `groups`)."""
        return [self._rates[id(p)] for p in self.weights()]

    def weights(self) -> list[nn.Parameter]:
        """Everything the weight step trains (the unrolled step perturbs these)."""
        return self.module_parameters() + self._head

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def build_supernet(ctx: SearchContext, task: Task, cfg: TrainConfig, sizes: int | str, device: torch.device,
                   gate: str, stretch: tuple[float, float], implicit: bool) -> Supernet:
    """A fresh model with a frozen backbone and every arm of `ctx.space` attached."""
    arms = expand_arms(ctx.space, ctx.budget, ctx.shape, sizes)
    if not arms:
        raise BudgetError(f"s3pet: no candidate fits the budget {ctx.budget.describe()}")
    used = {a.placement.plugin for a in arms}
    model, graph, plugins = ctx.training.fresh_model(
        task, {n: p for n, p in ctx.space.plugins.items() if n in used}, cfg.seed, cfg.batch_size)
    model.to(device)
    try:
        applied = attach(model, [(a.placement, Bound(plugins[a.placement.plugin], a.candidate.site,
                                                        a.placement.config)) for a in arms])
    except PluginError as exc:
        if len({a.placement.key for a in arms}) == len(arms):  # one size per candidate: not a matter of sizes
            raise
        raise PluginError(f"s3pet: {exc}; use sizes=1 (one size per candidate)") from exc
    for arm, (_, module) in zip(arms, applied.modules):
        arm.module = module
    return Supernet(model, graph, arms, constraints(ctx, arms), device, gate, stretch, implicit, ctx.seed,
                    {name: p.recipe for name, p in plugins.items()}, ctx.training)


def constraints(ctx: SearchContext, arms: list[Arm]) -> list[Constraint]:
    """The budget equations: parameters (n_i = exact counts) and, under a memory budget, bytes
    (n_i = searchspace.memory.marginal_cost, an additive upper bound, against the memory left
    after the frozen model and the logits)."""
    out = []
    limit = ctx.budget.limit
    if limit is not None:
        out.append(_relaxed(Constraint("params", torch.tensor([a.cost for a in arms], dtype=torch.float64),
                                       float(limit))))
    if ctx.budget.memory is not None:
        from petlsearch.searchspace.memory import estimate, marginal_cost

        space, shape = ctx.space, ctx.shape
        resolved = space.bound([a.placement for a in arms])
        logits = estimate(space.graph, resolved[:1], shape).breakdown.get("logits", 0)  # paid once by any structure
        fixed = estimate(space.graph, [], shape).total + logits
        costs = [marginal_cost(space.graph, p, s, c, shape) for p, s, c in resolved]
        if ctx.budget.memory <= fixed:
            raise BudgetError(f"s3pet: the memory budget {ctx.budget.memory:,} B leaves nothing for modules "
                              f"(the frozen model and its logits need {fixed:,} B)")
        out.append(_relaxed(Constraint("memory", torch.tensor(costs, dtype=torch.float64),
                                       float(ctx.budget.memory - fixed))))
    return out


def _relaxed(c: Constraint) -> Constraint:
    """The constraint with its warm-up start: a space that costs more than SPACE_RATIO budgets
    starts meeting space / SPACE_RATIO, so that every gate starts well open and every module
    trains before the budget closes most of them (at 0.01% of MiniLM the rank-1 space costs 48
    budgets: at the budget itself each gate would start 2% open and its module barely train)."""
    c.start = max(1.0, float(c.costs.sum()) / (SPACE_RATIO * c.budget))
    return c


def split_train(task: Task, holdout: float, seed: int) -> tuple[Task, Task]:
    """(weights task, alphas task): the training split cut in two, stratified when possible; both
    keep the validation and test splits and share the cached backbone."""
    from sklearn.model_selection import train_test_split

    x, y = task.splits.split("train")
    idx = np.arange(len(y))
    if len(idx) < 2:
        raise PetlsearchError("s3pet needs at least 2 training examples to hold some out for the alphas")
    try:
        keep, held = train_test_split(idx, test_size=holdout, stratify=y, random_state=seed)
    except ValueError:  # a class too small to stratify
        keep, held = train_test_split(idx, test_size=holdout, random_state=seed)

    def part(ids: np.ndarray) -> Task:
        ids = np.sort(ids)
        xs = [x[i] for i in ids] if isinstance(x, list) else x[ids]
        return replace(task, splits=replace(task.splits, x_train=xs, y_train=y[ids]))

    return part(keep), part(held)
