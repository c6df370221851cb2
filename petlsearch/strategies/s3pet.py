"""S3PET: differentiable sparse structure search, after "Sparse Structure Search for
Parameter-Efficient Tuning" (Hu et al., NeurIPS 2022; the authors' code is thunlp/S3Delta).

Every candidate of the space is attached at once to one fresh model (the supernet), at a fixed size,
with a structural parameter alpha_i driving its gate. By default each candidate's size is its
default scaled so that the whole space costs a few budgets (arms.auto_scale): under a small
budget that is the authors' space of rank-1 modules everywhere, from which the search keeps many.
The keep probabilities come from the shifted global sigmoid p_i = sigmoid((alpha_i - b) / beta),
whose shift b makes the expected cost sum_i n_i p_i equal to the budget (gates.solve_shift); beta
is annealed. A space that costs many budgets warms up: its gates first meet a budget of space / 4,
tightened geometrically to the budget itself over the first half of the steps, so that every
module trains before most gates close. During search the gates are stretched Gumbel-sigmoid
samples clamped to [0, 1] (exact zeros and ones); at evaluation they are deterministic. The optimisation is bi-level, as
DARTS: the module weights and the head train on one part of the TRAINING split, the alphas on the
held-out rest (half, as the authors), alternating first-order steps or, with `second_order`, the
unrolled step. The validation split never steers
the alphas (the supernet's final validation score is only reported). The structure keeps the
candidates of highest p_i while the budget holds; it is scored as trial 0 (trained from scratch at
the search fidelity) and the pipeline retrains it at full fidelity.

    strategy = S3PETSearch(steps=200, beta=(1.0, 0.1), sizes=3)
    result = strategy.run(ctx)          # result.best fits ctx.budget; result.extras has the alphas
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import torch

from petlsearch.errors import PetlsearchError
from petlsearch.runtime import pick_device, seed_everything, to_device
from petlsearch.strategies.arms import AUTO, Arm
from petlsearch.strategies.base import SearchContext, SearchResult, Strategy, TrialRecord
from petlsearch.strategies.gates import GATE_TYPES, STRETCH, beta_at, greedy_fill, warm_at
from petlsearch.strategies.supernet import Supernet, build_supernet, split_train

if TYPE_CHECKING:
    from collections.abc import Sequence

    from petlsearch.runners.trainer import TrainConfig
    from petlsearch.searchspace.structure import Placement

log = logging.getLogger(__name__)
SNAPSHOTS = 20  # alpha snapshots kept in the result
CURVE_POINTS = 200  # at most this many points of the search curve
FD_SCALE = 0.01  # DARTS' finite-difference radius: the perturbed weights move by 0.01 in norm


class _OutOfTime(Exception):
    pass


class S3PETSearch(Strategy):
    """Options: `steps` of supernet training (None: the context's fidelity steps x n_trials, the
    compute a black-box strategy spends), `arch_lr` (Adam on the alphas), `beta` (a constant or
    (start, end), annealed geometrically), `gate` (hard_concrete, straight_through or expected),
    `sizes` ("auto": each candidate at one size, its default scaled to the budget; 1: at its
    default size; n: up to n sizes from Dim.values(n) as separate candidates), `second_order`
    (unrolled DARTS step), `arch_every` (an alpha step every N weight steps), `holdout` (fraction of
    the training split for the alphas), `stretch` (l, r of the hard-concrete), `implicit_shift`
    (differentiate b through the budget), `warmup` (the fraction of the steps over which a space
    of more than SPACE_RATIO budgets has its budget tightened geometrically from space / SPACE_RATIO
    to the budget; 0: the budget from the first step)."""

    name = "s3pet"

    def __init__(self, steps: int | None = None, arch_lr: float = 0.1,
                 beta: float | Sequence[float] = (1.0, 0.1), gate: str = "hard_concrete", sizes: int | str = AUTO,
                 second_order: bool = False, arch_every: int = 1, holdout: float = 0.5,
                 stretch: Sequence[float] = STRETCH, implicit_shift: bool = True, warmup: float = 0.5) -> None:
        self.steps = steps
        self.arch_lr = arch_lr
        self.beta = beta
        self.gate = gate
        self.sizes = sizes
        self.second_order = second_order
        self.arch_every = arch_every
        self.holdout = holdout
        self.stretch = stretch
        self.implicit_shift = implicit_shift
        self.warmup = warmup

    def run(self, ctx: SearchContext) -> SearchResult:
        start = time.monotonic()
        self._check(ctx)
        # default: the training steps a black-box strategy would spend on n_trials trials (equal compute)
        steps = self.steps or ctx.fidelity.steps * max(1, ctx.n_trials)
        cfg = replace(ctx.fidelity, steps=steps, eval_every=0, patience=None)
        search_task, arch_task = split_train(ctx.task, self.holdout, ctx.seed)
        seed_everything(cfg.seed)  # module initialisation, so that a resumed search repeats itself
        net = build_supernet(ctx, search_task, cfg, self.sizes, pick_device(cfg.device), gate=self.gate,
                             stretch=tuple(self.stretch), implicit=self.implicit_shift)
        log.info("s3pet: %d candidates in the supernet, %s", len(net.arms), net.describe_budget())
        loop = _BiLevel(self, ctx, net, cfg, search_task, arch_task)
        supernet_val = loop.run()
        net.set_beta(beta_at(self.beta, cfg.steps, cfg.steps))
        net.set_warm(0.0)  # discretise against the budget itself, even when stopped during the warm-up
        with torch.no_grad():  # the logits order the arms as p does, without p's saturation at 1.0
            scores = net.logits().cpu().tolist()
        chosen = self.discretise(ctx, net.arms, scores)
        record = self._evaluate(ctx, [net.arms[i].placement for i in chosen])
        extras = {
            "candidates": [{"name": a.name, "cost": a.cost, **asdict(a.placement)} for a in net.arms],
            "cost_unit": net.unit, "alphas": loop.snapshots, "curve": loop.curve,
            "probabilities": dict(zip(net.names, map(_round, net.probabilities()))),
            "gates": dict(zip(net.names, map(_round, net.mean_gates()))),
            "chosen": [net.arms[i].name for i in sorted(chosen, key=lambda i: -scores[i])],
            "supernet_val": supernet_val, "stopped_early": loop.stopped, "steps": loop.step,
        }
        net.close()
        return self.result(ctx, [record], start, **extras)

    # ------------------------------------------------------------------ pieces
    def _check(self, ctx: SearchContext) -> None:
        if ctx.task is None:
            raise PetlsearchError("s3pet trains a supernet on the task's data: the search context has no task")
        if self.gate not in GATE_TYPES:
            raise PetlsearchError(f"s3pet: unknown gate type {self.gate!r}; choose one of {', '.join(GATE_TYPES)}")
        if not 0 < self.holdout < 1:
            raise PetlsearchError(f"s3pet: holdout must be a fraction in (0, 1), got {self.holdout!r}")
        if self.arch_every < 1 or (self.steps is not None and self.steps < 1):
            raise PetlsearchError("s3pet: steps and arch_every must be positive integers")
        if not 0 <= self.warmup <= 1:
            raise PetlsearchError(f"s3pet: warmup must be a fraction of the steps in [0, 1], got {self.warmup!r}")
        if self.sizes != AUTO and not (isinstance(self.sizes, int) and self.sizes >= 1):
            raise PetlsearchError(f"s3pet: sizes must be {AUTO!r} or a positive integer, got {self.sizes!r}")
        betas = [self.beta] if isinstance(self.beta, (int, float)) else list(self.beta)
        if len(betas) not in (1, 2) or not all(float(b) > 0 for b in betas):
            raise PetlsearchError(f"s3pet: beta must be a positive number or (start, end), got {self.beta!r}")
        low, high = self.stretch
        if not (low <= 0 and high >= 1 and low < high):
            raise PetlsearchError(f"s3pet: stretch (l, r) needs l <= 0 < 1 <= r, got {self.stretch!r}")
        if ctx.training is None:
            raise PetlsearchError("s3pet trains its supernet as a trial trains: the search context needs the runner's "
                                  "training (training=petlsearch.runners.trial.TRAINING)")

    @staticmethod
    def discretise(ctx: SearchContext, arms: Sequence[Arm], scores: Sequence[float]) -> list[int]:
        """Indices of the arms kept: in decreasing order of score (cheaper first on ties), each kept
        while the whole structure fits the budget (exact count with shared parameters once, memory
        re-estimated); at most one size per site and plugin. Returned in arm order."""
        order = sorted(range(len(arms)), key=lambda i: (-scores[i], arms[i].cost, i))
        chosen = greedy_fill(order, lambda idx: ctx.space.fits([arms[i].placement for i in idx], ctx.budget,
                                                               ctx.shape),
                             key=lambda i: arms[i].placement.key)
        if not chosen:
            budget = ctx.budget.describe()
            raise PetlsearchError(f"s3pet: no candidate fits the budget {budget}")
        return sorted(chosen)

    @staticmethod
    def _evaluate(ctx: SearchContext, placements: list[Placement]) -> TrialRecord:
        """Trial 0: the structure trained from scratch at the search fidelity (a resumed run whose
        journal already holds it, complete and identical, reuses it)."""
        prior = ctx.finished().get(0)
        if prior is not None and prior.status == "complete" and prior.placements == [asdict(p) for p in placements]:
            return prior
        return ctx.evaluate(0, placements)


class _BiLevel:
    """The alternating optimisation: trainer.train runs the weight steps (gates sampled by the
    supernet's forward pre-hook), and its after-step callback runs the alpha step."""

    def __init__(self, strategy: S3PETSearch, ctx: SearchContext, net: Supernet, cfg: TrainConfig,
                 search_task: Any, arch_task: Any) -> None:
        self.s, self.ctx, self.net, self.cfg = strategy, ctx, net, cfg
        self.search_task = search_task
        self.arch_batches = arch_task.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed + 1, epochs=None)
        self.train_batches = (search_task.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed + 2,
                                                  epochs=None) if strategy.second_order else None)
        self.optimizer = torch.optim.Adam([net.alpha], lr=strategy.arch_lr)
        self.snapshots: list[dict[str, Any]] = []
        self.curve: list[dict[str, float]] = []
        self.arch_loss: torch.Tensor | None = None
        self.step = 0
        self.stopped = False
        self.every_snapshot = max(1, cfg.steps // SNAPSHOTS)
        self.every_point = max(1, cfg.steps // CURVE_POINTS)

    def run(self) -> dict[str, float]:
        net, cfg = self.net, self.cfg
        net.set_beta(beta_at(self.s.beta, 0, cfg.steps))
        net.set_warm(warm_at(self.s.warmup, 0, cfg.steps))
        self._snapshot(0)
        try:
            result = self.ctx.training.train(net.model, self.search_task, net.groups(cfg, self.search_task.new_head),
                                             cfg, after_step=[self.after_step])
            return result.val
        except _OutOfTime:
            self.stopped = True
            log.info("s3pet: out of time after %d supernet steps; discretising the current alphas", self.step)
            return {}

    def after_step(self, step: int) -> None:
        self.step = step
        if step % self.s.arch_every == 0:
            self.arch_loss = self._second_order() if self.s.second_order else self._first_order()
        self.net.set_beta(beta_at(self.s.beta, step, self.cfg.steps))
        self.net.set_warm(warm_at(self.s.warmup, step, self.cfg.steps))
        if step % self.every_point == 0 or step == self.cfg.steps:
            self._point(step)
        if step % self.every_snapshot == 0 or step == self.cfg.steps:
            self._snapshot(step)
        if self.ctx.progress is not None and (step % max(1, self.cfg.steps // 10) == 0):
            last = self.curve[-1] if self.curve else {}
            self.ctx.progress(f"supernet step {step}/{self.cfg.steps}: loss {last.get('loss')}, "
                              f"expected budget use {last.get('budget_use')}, beta {_round(self.net.beta)}")
        if self.ctx.out_of_time():
            raise _OutOfTime

    # ------------------------------------------------------------------ alpha steps
    def _loss(self, batch: dict[str, Any], arch: bool) -> torch.Tensor:
        """The loss of the supernet in training mode; gates carry alpha's gradient when `arch`."""
        device = self.net.device
        amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.net.arch_grad = arch
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return self.net.model(**batch).loss
        finally:
            self.net.arch_grad = False

    def _first_order(self) -> torch.Tensor:
        batch = to_device(next(self.arch_batches), self.net.device)
        loss = self._loss(batch, arch=True)
        (grad,) = torch.autograd.grad(loss, [self.net.alpha], allow_unused=True)
        self._apply(grad)
        return loss.detach()

    def _second_order(self) -> torch.Tensor:
        """DARTS' unrolled step with a plain SGD virtual step w' = w - xi * dL_train/dw (xi: each
        weight's own learning rate, its plugin's recipe): grad = dL_val(w', a)/da - (dL_train(w+)/da
        - dL_train(w-)/da) / 2eps, w+- = w +- eps * xi * dL_val/dw' (the Hessian-vector product with
        xi * dL_val/dw'). The same gate noise is used in every forward of the step."""
        net = self.net
        weights, xi = net.weights(), net.rates()
        train_batch = to_device(next(self.train_batches), net.device)
        val_batch = to_device(next(self.arch_batches), net.device)
        backup = [w.detach().clone() for w in weights]
        seen = (net.last_loss, net.last_gates)  # the curve records the weight step, not the virtual one
        with net.same_noise():
            grads = _grads(self._loss(train_batch, arch=False), weights)
            with torch.no_grad():
                for w, g, rate in zip(weights, grads, xi):
                    w.sub_(rate * g)
            val_loss = self._loss(val_batch, arch=True)
            d_all = _grads(val_loss, [net.alpha, *weights])
            d_alpha = d_all[0]
            direction = [rate * d for rate, d in zip(xi, d_all[1:])]
            eps = FD_SCALE / (torch.cat([d.flatten() for d in direction]).norm() + 1e-12)
            hess = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for w, b, d in zip(weights, backup, direction):
                        w.copy_(b + sign * eps * d)
                hess.append(_grads(self._loss(train_batch, arch=True), [net.alpha])[0])
        with torch.no_grad():
            for w, b in zip(weights, backup):
                w.copy_(b)
        net.last_loss, net.last_gates = seen
        self._apply(d_alpha - (hess[0] - hess[1]) / (2 * eps))
        return val_loss.detach()

    def _apply(self, grad: torch.Tensor | None) -> None:
        alpha = self.net.alpha
        alpha.grad = torch.zeros_like(alpha) if grad is None else grad.detach().to(alpha.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ records
    def _point(self, step: int) -> None:
        net = self.net
        gated, active = net.sampled_use()
        self.curve.append({"step": step, "beta": _round(net.beta), "loss": _item(net.last_loss),
                           "arch_loss": _item(self.arch_loss), "budget_use": _round(net.expected_use()),
                           "gate_use": _round(gated), "active_use": _round(active)})

    def _snapshot(self, step: int) -> None:
        self.snapshots.append({"step": step, "beta": _round(self.net.beta),
                               "alpha": [_round(a) for a in self.net.alpha.detach().cpu().tolist()]})


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d params, zeros for a parameter the loss does not reach (a module gated off)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _item(x: torch.Tensor | None) -> float | None:
    return None if x is None else _round(float(x))


def _round(x: float) -> float:
    return float(f"{float(x):.6g}")
