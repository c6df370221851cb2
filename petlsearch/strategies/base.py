"""The Strategy protocol, the search context every strategy receives, and the common SearchResult.

A strategy proposes structures (lists of Placements) that fit the budget and asks the context to
evaluate them; `SearchContext.evaluate` trains one trial, records it as complete, pruned or failed
(an exception or a NaN never stops the search), and appends it to the run's journal so that an
interrupted search resumes without rerunning finished trials.
"""

from __future__ import annotations

import logging
import math
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from petlsearch.errors import BudgetError, PetlsearchError, did_you_mean
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.structure import Placement
from petlsearch.strategies.journal import Journal

if TYPE_CHECKING:
    from torch import nn

    from petlsearch.plugins.base import Plugin
    from petlsearch.runners.tasks import Task
    from petlsearch.runners.trainer import ParamGroup, TrainConfig, TrainResult
    from petlsearch.runners.trial import TrialOutcome
    from petlsearch.searchspace.budget import Budget
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.space import SearchSpace

log = logging.getLogger(__name__)
STRATEGIES = {
    "random": "petlsearch.strategies.random:RandomSearch",
    "optuna": "petlsearch.strategies.optuna:OptunaSearch",
    "ray": "petlsearch.strategies.ray_tune:RayTuneSearch",
    "s3pet": "petlsearch.strategies.s3pet:S3PETSearch",
}
# the learning-rate scale a black-box strategy searches with the structure (log-uniform): most PEFT
# papers tune the rate per method, and AutoPEFT searches it with the structure; the recipes are
# the centre, so 0.1x..10x holds every rate the recipes benchmark found best for some plugin
LR_SCALES = (0.1, 10.0)


@dataclass
class TrialRecord:
    """One evaluated structure. status: complete | pruned | failed."""

    number: int
    placements: list[dict[str, Any]]
    params: int
    status: str
    score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    intermediate: list[tuple[int, float]] = field(default_factory=list)
    memory: int | None = None
    seconds: float = 0.0
    error: str = ""
    train: dict[str, float] = field(default_factory=dict)  # training settings searched with it (lr_scale)

    def structure(self) -> list[Placement]:
        return [Placement(**p) for p in self.placements]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialRecord:
        d = dict(d)
        d["intermediate"] = [tuple(x) for x in d.get("intermediate", [])]
        return cls(**d)


@dataclass
class SearchResult:
    strategy: str
    best: list[Placement]
    history: list[TrialRecord]
    pareto: list[TrialRecord]
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)  # the best trial's searched training settings

    @property
    def best_record(self) -> TrialRecord | None:
        done = [r for r in self.history if r.status == "complete" and r.score is not None]
        return max(done, key=rank_key) if done else None


def trial_loss(record: TrialRecord) -> float:
    """The trial's validation loss (inf when it has none)."""
    loss = record.metrics.get("loss")
    return float(loss) if loss is not None and math.isfinite(loss) else math.inf


def rank_key(record: TrialRecord) -> tuple[float, float, int]:
    """How complete trials are ranked (the largest first): the lower validation loss, then the
    higher score, then fewer parameters. Measured (python -m bench --only fidelity): over twelve
    random structures at 0.1% of MiniLM, minus the loss of a 30-step trial ranks their 250-step test
    accuracies with Spearman's rho 0.85, its accuracy with 0.21 (most short trials sit at the
    majority class, where accuracies tie and their last digits are noise)."""
    return (-trial_loss(record), float(record.score), -record.params)


def describe(record: TrialRecord) -> str:
    """`score=0.7031 loss=0.5712 params=1,920 lr x1.7` for progress lines."""
    score = "failed" if record.score is None else f"{record.score:.4f}"
    loss = trial_loss(record)
    parts = [f"score={score}"] + ([f"loss={loss:.4f}"] if math.isfinite(loss) else [])
    parts.append(f"params={record.params:,}")
    if "lr_scale" in record.train:
        parts.append(f"lr x{record.train['lr_scale']:.3g}")
    return " ".join(parts)


def trial_value(score: float, loss: float | None) -> float:
    """What a trial is ranked by, as one number (higher is better): minus the validation loss, or the
    score when there is none. Pruners read it at each evaluation and black-box optimisers at the end,
    so both order trials as `rank_key` does. Early in training the accuracy of a validation sample
    ties (weak trials all predict the majority class) and cannot rank trials; the loss can."""
    return -loss if loss is not None and math.isfinite(loss) else score


def pareto_front(records: Sequence[TrialRecord], cost: str = "params") -> list[TrialRecord]:
    """Complete trials not dominated in (higher score, lower `cost`: "params" or "memory"), sorted by
    that cost (of trials that tie on both, the first)."""
    def spent(r: TrialRecord) -> float:
        return float(r.params if cost == "params" else (r.memory or 0))

    done = sorted((r for r in records if r.status == "complete" and r.score is not None),
                  key=lambda r: (spent(r), -r.score))
    front, best = [], -math.inf
    for r in done:
        if r.score > best:
            front.append(r)
            best = r.score
    return front


class Training(Protocol):
    """The trial interface: what a strategy that trains a model itself (S3PET's supernet) asks of
    the runner that called it, so that strategies never import the runners. `runners.trial.TRAINING`
    implements it, and `runners.search.search` passes it in the context."""

    def fresh_model(self, task: Task, plugins: dict[str, Plugin], seed: int,
                    batch_size: int) -> tuple[nn.Module, ModelGraph, dict[str, Plugin]]:
        """A fresh frozen backbone of `task`, its graph, and fresh copies of `plugins`, the data-driven
        ones prepared on it, as every trial starts (nothing attached yet)."""
        ...

    def groups(self, model: nn.Module, graph: ModelGraph, by_plugin: dict[str, list[nn.Parameter]],
               recipes: dict[str, Any], cfg: TrainConfig, new_head: bool = True) -> list[ParamGroup]:
        """The parameter groups a trial trains: each plugin's at its recipe, and the head (made
        trainable) unless `cfg` or `new_head` says not to."""
        ...

    def train(self, model: nn.Module, task: Task, groups: list[ParamGroup], cfg: TrainConfig,
              after_step: Sequence[Callable[[int], None]] = ()) -> TrainResult:
        """The trials' training loop, with `after_step` callbacks after every optimizer step."""
        ...


@dataclass
class SearchContext:
    """What a strategy needs: the space and budget, how to evaluate a structure, where to record."""

    space: SearchSpace
    budget: Budget
    task: Task | None
    fidelity: TrainConfig
    n_trials: int = 8
    seed: int = 0
    out_dir: Path | None = None
    timeout: float | None = None
    shape: BatchShape = field(default_factory=BatchShape)
    objective: Callable[..., TrialOutcome] | None = None  # (placements, report, train) -> TrialOutcome
    progress: Callable[[str], None] | None = None
    lr_scales: tuple[float, float] | None = LR_SCALES  # None: trials train at the recipes' rates
    training: Training | None = None  # for strategies that train a model themselves (S3PET)
    _journal: Journal | None = field(default=None, repr=False)
    _start: float = field(default_factory=time.monotonic, repr=False)

    @property
    def journal(self) -> Journal | None:
        if self._journal is None and self.out_dir is not None:
            self._journal = Journal(Path(self.out_dir) / "trials.jsonl")
        return self._journal

    def finished(self) -> dict[int, TrialRecord]:
        """Trials that ended (complete, pruned or failed) in an earlier run of this search."""
        if self.journal is None:
            return {}
        done = {r["number"]: TrialRecord.from_dict(r) for r in self.journal.records() if r.get("status") != "running"}
        known = {c.key for c in self.space.candidates}
        for record in done.values():
            stale = [p.candidate_key for p in record.structure() if p.candidate_key not in known]
            if stale:
                raise PetlsearchError(f"cannot resume from {self.journal.path}: trial {record.number} places "
                                      f"{stale[:2]}, which this search space does not have (another model, "
                                      "plugin set or petlsearch version made it); start a new --out")
        return done

    def out_of_time(self) -> bool:
        return self.timeout is not None and time.monotonic() - self._start > self.timeout

    def __post_init__(self) -> None:
        if self.space is not None:  # one backbone and head: one limit everywhere
            self.budget = self.space.bind(self.budget)

    def limit(self) -> int | None:
        return self.budget.limit

    def check_fits(self, placements: Sequence[Placement]) -> int:
        """The exact count of `placements`; raise if over budget (strategies must never return that)."""
        n = self.space.count(placements)
        if not self.space.fits(placements, self.budget, self.shape):
            raise BudgetError(f"structure with {n:,} parameters exceeds {self.budget.describe()}")
        return n

    def sample_train(self, rng: random.Random) -> dict[str, float]:
        """Training settings drawn with a structure: the learning-rate scale, log-uniform in
        `lr_scales` ({} when it is not searched)."""
        if self.lr_scales is None:
            return {}
        low, high = self.lr_scales
        return {"lr_scale": float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.4g}")}

    def evaluate(self, number: int, placements: Sequence[Placement],
                 report: Callable[..., bool] | None = None, train: dict[str, float] | None = None) -> TrialRecord:
        """Train and score one structure (with the searched training settings `train`, e.g. its
        lr_scale); never raises for a failing trial, records it instead."""
        params = self.check_fits(placements)
        plain = [asdict(p) for p in placements]
        train = dict(train or {})
        memory = self.space.memory(placements, self.shape) if self.budget.memory is not None else None
        if self.journal is not None:
            self.journal.append({"number": number, "status": "running", "placements": plain, "params": params,
                                 "train": train})
        seen: list[tuple[int, float]] = []

        def on_report(step: int, score: float, loss: float | None = None) -> bool:
            seen.append((step, score))
            return bool(report(step, score, loss=loss)) if report is not None else False

        start = time.perf_counter()
        try:
            outcome = self.objective(placements, on_report, train)
            if not math.isfinite(outcome.score):
                raise FloatingPointError(f"score is {outcome.score}")
            status = "pruned" if outcome.pruned else "complete"
            record = TrialRecord(number, plain, params, status, outcome.score, outcome.metrics, seen, memory,
                                 time.perf_counter() - start, train=train)
        except (KeyboardInterrupt, PetlsearchError):
            raise
        except Exception as exc:  # a trial that raises or diverges is recorded, the search goes on
            log.warning("trial %d failed: %s: %s", number, type(exc).__name__, exc)
            record = TrialRecord(number, plain, params, "failed", None, {}, seen, memory,
                                 time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}", train=train)
            log.debug("%s", traceback.format_exc())
        if self.journal is not None:
            self.journal.append(record.to_dict())
        if self.progress is not None:
            self.progress(f"trial {number}: {record.status} {describe(record)}")
        return record


class Strategy:
    """A search strategy: `run(ctx)` returns a SearchResult whose best structure fits ctx.budget.

    Constructors store their options unchanged; all state is made in `run`.
    """

    name: ClassVar[str] = ""

    def run(self, ctx: SearchContext) -> SearchResult:
        raise NotImplementedError

    def result(self, ctx: SearchContext, history: list[TrialRecord], start: float, **extras: Any) -> SearchResult:
        """The common SearchResult: best complete trial (highest score, then fewest params)."""
        history = sorted(history, key=lambda r: r.number)
        done = [r for r in history if r.status == "complete" and r.score is not None]
        if not done:
            raise PetlsearchError(f"{self.name}: no trial completed ({len(history)} ran; see trials.jsonl "
                                  "and the log for their errors)")
        best = max(done, key=rank_key)
        return SearchResult(self.name, best.structure(), history, pareto_front(history),
                            time.monotonic() - start, extras, dict(best.train))


def get_strategy(name: str, **options: Any) -> Strategy:
    """A strategy by name (random, optuna, ray, s3pet) or 'package.module:Class'."""
    import importlib

    spec = STRATEGIES.get(name, name if ":" in name else None)
    if spec is None:
        raise PetlsearchError(f"unknown strategy '{name}'{did_you_mean(name, STRATEGIES)}; "
                              f"choose one of {', '.join(STRATEGIES)}")
    module, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise PetlsearchError(f"strategy '{name}' is not available: {exc}") from exc
    import inspect

    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise PetlsearchError(f"strategy '{name}' has no option(s) {unknown}; its options: {accepted}")
    return cls(**options)
