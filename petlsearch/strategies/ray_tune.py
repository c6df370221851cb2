"""The Optuna trial on Ray Tune: OptunaSearch (TPE, or NSGA-II for a Pareto search) proposes the
structures and ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020)
stops weak trials from their intermediate validation losses.

Runs on a local Ray sized to this machine by default, or on an existing cluster (`address`, see
docs/ray_cluster.md). A trial gets `cpus_per_trial` / `gpus_per_trial`; a trial that raises or whose
worker dies is retried up to `max_failures` times, then recorded as failed. The experiment folder
(`<out>/ray/tune`) holds Ray's state: an interrupted search is restored from it, finished trials are
kept and the others run again. The structure is decoded and repaired on the driver (see
strategies.encoding) and travels in the trial's config; the objective goes to the workers through
the object store (cloudpickle), so on a cluster petlsearch and the model files must exist on every
node. Trials are written to trials.jsonl when the experiment ends.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petlsearch._imports import require
from petlsearch.errors import PetlsearchError
from petlsearch.searchspace.structure import Placement
from petlsearch.strategies.base import (
    SearchContext,
    SearchResult,
    Strategy,
    TrialRecord,
    describe,
    pareto_front,
    trial_value,
)
from petlsearch.strategies.encoding import Encoding
from petlsearch.strategies.optuna import OBJECTIVES, parse_objectives

if TYPE_CHECKING:
    from collections.abc import Callable

    from petlsearch.searchspace.memory import BatchShape

log = logging.getLogger(__name__)
EXPERIMENT = "tune"
LOCAL_OBJECT_STORE = 200 * 2**20  # bytes; trials only fetch the objective from it


class RayTuneSearch(Strategy):
    """Ray Tune with OptunaSearch + ASHA.

    address: an existing cluster ("auto", "ray://head:10001", "head:6379"); None starts a local Ray.
    num_cpus / num_gpus: size of the local Ray (default: this machine). cpus_per_trial / gpus_per_trial:
    each trial's share. max_concurrent: trials at once (default: as many as the resources allow).
    max_failures: retries of a trial that raises or dies. scheduler: 'asha' (stop weak trials early)
    or 'fifo' (train every trial to the end). grace_period / reduction_factor: ASHA (steps; default
    grace: the fidelity's eval_every). objectives, startup_trials, group_by, buckets, infeasible:
    as for the optuna strategy (a Pareto search uses NSGA-II and no early stopping).
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                 cpus_per_trial: float = 1, gpus_per_trial: float = 0, max_concurrent: int | None = None,
                 max_failures: int = 2, scheduler: str = "asha", grace_period: int | None = None,
                 reduction_factor: int = 3,
                 objectives: tuple[str, ...] | list[str] | str = ("score",), startup_trials: int | None = None,
                 group_by: str = "auto", buckets: int = 4, infeasible: str = "repair") -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.cpus_per_trial = cpus_per_trial
        self.gpus_per_trial = gpus_per_trial
        self.max_concurrent = max_concurrent
        if scheduler not in ("asha", "fifo"):
            raise PetlsearchError(f"ray: unknown scheduler {scheduler!r}; valid: 'asha', 'fifo'")
        self.max_failures = max_failures
        self.scheduler = scheduler
        self.grace_period = grace_period
        self.reduction_factor = reduction_factor
        self.objectives = objectives
        self.startup_trials = startup_trials
        self.group_by = group_by
        self.buckets = buckets
        self.infeasible = infeasible

    def run(self, ctx: SearchContext) -> SearchResult:
        ray = require("ray", "the ray strategy")
        require("ray.tune", "the ray strategy")
        objectives = parse_objectives(self.objectives)
        started = self._init(ray)
        try:
            return self._search(ctx, objectives)
        finally:
            if started:  # never shut down a Ray that the caller started
                ray.shutdown()

    def _init(self, ray: Any) -> bool:
        """Connect to `address` or start a local Ray; True when this strategy did (and must shut it down)."""
        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
            return True
        # workers import what the driver imports (petlsearch from a checkout, a project's task module)
        paths = os.pathsep.join(p for p in sys.path if p)
        ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, num_gpus=self.num_gpus, include_dashboard=False,
                 log_to_driver=False, object_store_memory=LOCAL_OBJECT_STORE,
                 runtime_env={"env_vars": {"PYTHONPATH": paths, "TOKENIZERS_PARALLELISM": "false"}})
        return True

    def _search(self, ctx: SearchContext, objectives: tuple[str, ...]) -> SearchResult:
        from ray import tune

        start = time.monotonic()
        if ctx.objective is None:
            raise PetlsearchError("the ray strategy needs a SearchContext with an objective")
        enc = Encoding(ctx.space, ctx.budget, ctx.shape, self.group_by, self.buckets, infeasible=self.infeasible,
                       lr_scales=ctx.lr_scales)
        root = (Path(ctx.out_dir).resolve() / "ray" if ctx.out_dir
                else Path(tempfile.mkdtemp(prefix="petlsearch-ray-")))  # no run folder: nothing to restore
        trainable = tune.with_resources(tune.with_parameters(_trainable, objective=ctx.objective,
                                                             steps=ctx.fidelity.steps,
                                                             threads=max(1, int(self.cpus_per_trial))),
                                        {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial})
        path = str(root / EXPERIMENT)
        if ctx.out_dir is not None and tune.Tuner.can_restore(path):
            log.info("ray: restoring the interrupted experiment in %s", path)
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
        else:
            retries = tune.FailureConfig(max_failures=self.max_failures)
            tuner = tune.Tuner(trainable, tune_config=self._tune_config(ctx, objectives, enc),
                               run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(root), verbose=0,
                                                         failure_config=retries))
        grid = tuner.fit()
        history = self._history(ctx, grid)
        extras = {"experiment": path, "groups": len(enc.groups), "group_by": enc.group_by,
                  "rejected": sum(1 for r in grid if r.config.get("placements") is None),
                  "objectives": list(objectives), "errors": sum(1 for r in grid if r.error is not None)}
        result = self.result(ctx, history, start, **extras)
        if len(objectives) > 1:
            result.pareto = pareto_front(history, cost=objectives[1])
        return result

    def _tune_config(self, ctx: SearchContext, objectives: tuple[str, ...], enc: Encoding) -> Any:
        import optuna
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
        from ray.tune.search.optuna import OptunaSearch as RayOptuna

        startup = self.startup_trials or max(2, min(10, ctx.n_trials // 3))
        modes = ["max" if OBJECTIVES[o] == "maximize" else "min" for o in objectives]
        if len(objectives) == 1:
            sampler = optuna.samplers.TPESampler(seed=ctx.seed, n_startup_trials=startup)
            steps = ctx.fidelity.steps
            grace = min(self.grace_period or ctx.fidelity.eval_every or steps, steps)
            # ASHA and the searcher both rank trials by `trial_value` (the validation loss): metric "signal"
            scheduler = (ASHAScheduler(time_attr="step", metric="signal", mode="max", max_t=steps,
                                       grace_period=grace, reduction_factor=self.reduction_factor)
                         if self.scheduler == "asha" else FIFOScheduler())
        else:  # ASHA stops on one metric only; a Pareto search trains every trial to the end
            sampler = optuna.samplers.NSGAIISampler(seed=ctx.seed, population_size=max(4, startup))
            scheduler = FIFOScheduler()
        memory = ctx.budget.memory is not None or "memory" in objectives
        searcher = RayOptuna(space=_Proposer(enc, ctx.shape if memory else None),
                             metric=list(objectives) if len(objectives) > 1 else "signal",
                             mode=modes if len(objectives) > 1 else "max", sampler=sampler)
        budget_s = max(1.0, ctx.timeout - (time.monotonic() - ctx._start)) if ctx.timeout else None
        return tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                               num_samples=ctx.n_trials, max_concurrent_trials=self.max_concurrent,
                               time_budget_s=budget_s, reuse_actors=True)

    def _history(self, ctx: SearchContext, grid: Any) -> list[TrialRecord]:
        """Records from Ray's results (its state is the source of truth), appended to trials.jsonl;
        raises KeyboardInterrupt when Ray swallowed a Ctrl-C and left trials unfinished."""
        known = ctx.finished()
        history, unfinished = [], 0
        for res, status in zip(grid, _statuses(grid)):
            # Tune marks `done` on a trial's last result when it returned or ASHA stopped it; one stopped
            # by a Ctrl-C (or the time budget) is TERMINATED without it, and a restore reruns it
            if status != "ERROR" and not (status == "TERMINATED" and (res.metrics or {}).get("done")):
                unfinished += 1
                continue
            record = _record(res, status)
            if record is None:
                continue
            history.append(record)
            if ctx.journal is not None and known.get(record.number) != record:
                ctx.journal.append(record.to_dict())
                if ctx.progress is not None:
                    ctx.progress(f"trial {record.number}: {record.status} {describe(record)}")
        if unfinished and not ctx.out_of_time():
            raise KeyboardInterrupt(f"ray search interrupted with {unfinished} trial(s) unfinished; "
                                    "run it again on the same folder to restore it")
        return history


def _statuses(grid: Any) -> list[str]:
    """Each result's trial status (TERMINATED, ERROR, or PENDING/RUNNING/PAUSED when cut off).
    ResultGrid lists its results in the order of its analysis' trials."""
    analysis = getattr(grid, "_experiment_analysis", None)
    trials = getattr(analysis, "trials", None)
    if trials is None or len(trials) != len(grid):
        return ["ERROR" if res.error is not None else "TERMINATED" for res in grid]
    return [t.status for t in trials]


class _Proposer:
    """Ray's define-by-run space: asks the optuna trial, decodes and repairs on the driver, and hands
    the structure to the trial in its config (a plain class, so Ray's searcher checkpoint pickles it)."""

    def __init__(self, encoding: Encoding, shape: BatchShape | None) -> None:
        self.encoding = encoding
        self.shape = shape  # set: report each structure's estimated training memory

    def __call__(self, trial: Any) -> dict[str, Any]:
        enc = self.encoding
        params = enc.suggest(trial)
        placements = enc.decode(params)
        if placements is None:
            return {"number": trial.number, "placements": None, "params": 0}
        out = {"number": trial.number, "placements": [asdict(p) for p in placements],
               "params": enc.space.count(placements), "train": enc.train(params)}
        if self.shape is not None:
            out["memory"] = enc.space.memory(placements, self.shape)
        return out


def _trainable(config: dict[str, Any], objective: Callable[..., Any], steps: int, threads: int = 1) -> None:
    """One Ray trial: train the structure in `config`, reporting each evaluation to ASHA."""
    import torch
    from ray import tune

    torch.set_num_threads(threads)
    base = {"params": config["params"], "memory": config.get("memory")}
    if config["placements"] is None:  # rejected on the driver: nothing to train
        tune.report({"score": math.nan, "signal": math.nan, "step": 0, "rejected": 1, **base})
        return
    placements = [Placement(**p) for p in config["placements"]]

    def report(step: int, score: float, loss: float | None = None) -> bool:
        if step < steps:  # the last step is reported below, with the outcome (ASHA stops at max_t)
            tune.report({"score": score, "signal": trial_value(score, loss), "step": step, **base})
        return False  # ASHA stops the trial itself

    outcome = objective(placements, report, config.get("train", {}))
    done = getattr(getattr(outcome, "train", None), "steps", steps)  # fewer when stopped early
    final = {"score": outcome.score, "signal": trial_value(outcome.score, outcome.metrics.get("loss")), "step": done,
             "final": 1, "pruned": int(bool(outcome.pruned)), **base,
             **{f"val_{k}": v for k, v in outcome.metrics.items()}}
    if not math.isfinite(outcome.score):
        final["error"] = f"score is {outcome.score}"
    tune.report(final)


def _record(res: Any, status: str) -> TrialRecord | None:
    """A TrialRecord from one ended Ray trial; None for a proposal rejected before training."""
    config, metrics = res.config, res.metrics or {}
    if config.get("placements") is None:
        return None
    frame = res.metrics_dataframe
    steps = []
    if frame is not None and "step" in frame and "score" in frame:
        steps = [(int(s), float(v)) for s, v in zip(frame["step"], frame["score"]) if math.isfinite(v)]
        steps = list(dict(steps).items())  # the final report repeats the last step
    score, error = metrics.get("score"), metrics.get("error") or ""
    if status == "ERROR" or res.error is not None:
        status, score, error = "failed", None, f"{type(res.error).__name__}: {res.error}"[:2000]
    elif error or score is None or not math.isfinite(score):
        status, score = "failed", None
    elif metrics.get("final") and not metrics.get("pruned"):
        status = "complete"
    else:  # stopped by ASHA before its last step
        status = "pruned"
    val = {k[4:]: v for k, v in metrics.items() if k.startswith("val_")}
    return TrialRecord(int(config["number"]), config["placements"], int(config["params"]), status, score, val,
                       steps, config.get("memory"), float(metrics.get("time_total_s", 0.0)), error,
                       dict(config.get("train", {})))
