"""Black-box search with Optuna: TPE (Bergstra et al., NeurIPS 2011) for the validation score, or a
(score, params) / (score, memory) Pareto search with NSGA-II (Deb et al., 2002) or multi-objective TPE.

One trial is one structure under the budget (see strategies.encoding) and a learning-rate scale of
the plugins' recipes, trained at reduced fidelity;
its intermediate validation losses go to a pruner (median or Hyperband) that stops weak trials early.
The study lives in a journal file (or sqlite / an RDB URL) inside the run folder: it is the source of
truth on resume. A resumed search counts the trials that ended (complete, pruned or failed), runs
only the remainder of `n_trials`, never reruns a finished trial, and reruns a trial that a crash cut
off. Every trial also goes through `SearchContext.evaluate`, so trials.jsonl and the run folder's
pictures are the same as for the other strategies.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petlsearch._imports import require
from petlsearch.errors import PetlsearchError, did_you_mean
from petlsearch.strategies.base import SearchContext, SearchResult, Strategy, TrialRecord, trial_value
from petlsearch.strategies.encoding import Encoding

if TYPE_CHECKING:
    from collections.abc import Callable

    import optuna

log = logging.getLogger(__name__)
OBJECTIVES = {"score": "maximize", "params": "minimize", "memory": "minimize"}
METRIC_NAMES = {"score": "minus validation loss", "params": "trainable parameters", "memory": "training memory (bytes)"}
SAMPLERS = ("auto", "tpe", "nsga2", "random")
PRUNERS = ("median", "hyperband", "none")
STUDY = "petlsearch"


class OptunaSearch(Strategy):
    """Optuna ask-and-tell over encoded structures.

    objectives: ("score",) or ("score", "params") / ("score", "memory") for a Pareto search.
    sampler: auto (TPE; NSGA-II for several objectives) | tpe | nsga2 | random, or an optuna sampler.
    pruner: median | hyperband | none, or an optuna pruner (single objective only: optuna cannot
        prune a multi-objective trial). storage: journal | sqlite | memory | an RDB URL.
    startup_trials: random trials before TPE / the pruner start (default: a third of n_trials, 2..10).
    group_by, buckets, infeasible: the encoding (see strategies.encoding).
    max_rejections: rejected (empty or over-budget) proposals tolerated before the search stops.
    """

    name = "optuna"

    def __init__(self, objectives: tuple[str, ...] | list[str] | str = ("score",), sampler: Any = "auto",
                 pruner: Any = "median", storage: str | None = "journal", startup_trials: int | None = None,
                 group_by: str = "auto", buckets: int = 4, infeasible: str = "repair",
                 max_rejections: int = 200) -> None:
        self.objectives = objectives
        self.sampler = sampler
        self.pruner = pruner
        self.storage = storage
        self.startup_trials = startup_trials
        self.group_by = group_by
        self.buckets = buckets
        self.infeasible = infeasible
        self.max_rejections = max_rejections

    def run(self, ctx: SearchContext) -> SearchResult:
        optuna = require("optuna", "the optuna strategy")
        start = time.monotonic()
        objectives = parse_objectives(self.objectives)
        enc = Encoding(ctx.space, ctx.budget, ctx.shape, self.group_by, self.buckets, infeasible=self.infeasible,
                       lr_scales=ctx.lr_scales)
        study = self._study(optuna, ctx, objectives, enc)
        _recover(optuna, study, ctx, objectives)
        startup = self.startup_trials or max(2, min(10, ctx.n_trials // 3))
        # a resumed study reseeds so that TPE's random start-up does not propose the first run's trials again
        seed = ctx.seed + 7919 * len(study.trials)
        study.sampler = self._sampler(optuna, objectives, startup, seed)
        study.pruner = self._pruner(optuna, objectives, startup, ctx)
        done, rejected = _finished(study), 0
        if done:
            log.info("optuna: resuming %s with %d of %d trials finished", ctx.out_dir, done, ctx.n_trials)
        while done < ctx.n_trials and not ctx.out_of_time():
            trial = study.ask()
            params = enc.suggest(trial)
            placements = enc.decode(params)
            if placements is None:  # never trained; pruned so that TPE learns to avoid the region
                rejected += 1
                trial.set_user_attr("rejected", True)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                if rejected > self.max_rejections:
                    log.warning("optuna: stopping after %d rejected proposals (%s)", rejected, dict(enc.rejections))
                    break
                continue
            report = _reporter(trial) if len(objectives) == 1 else None
            record = ctx.evaluate(trial.number, placements, report, enc.train(params))
            _tell(optuna, study, trial, record, objectives, ctx)
            done += 1
        history = _records(study)
        extras = {"study": study.study_name, "storage": self._storage_path(ctx), "groups": len(enc.groups),
                  "group_by": enc.group_by, "rejected": dict(enc.rejections), "objectives": list(objectives)}
        result = self.result(ctx, history, start, **extras)
        if len(objectives) > 1:
            front = {t.number for t in study.best_trials}
            result.pareto = sorted((TrialRecord.from_dict(t.user_attrs["record"]) for t in study.trials
                                    if t.number in front and "record" in t.user_attrs), key=lambda r: r.params)
        return result

    # ------------------------------------------------------------------ parts
    def _storage_path(self, ctx: SearchContext) -> str | None:
        if ctx.out_dir is None or self.storage in (None, "memory"):
            return None
        if self.storage == "journal":
            return str(Path(ctx.out_dir) / "optuna.journal")
        if self.storage == "sqlite":
            return f"sqlite:///{Path(ctx.out_dir).resolve() / 'optuna.db'}"
        if "://" in str(self.storage):
            return str(self.storage)
        raise PetlsearchError(f"optuna storage '{self.storage}' is not journal, sqlite, memory or a URL")

    def _study(self, optuna: Any, ctx: SearchContext, objectives: tuple[str, ...], enc: Encoding) -> optuna.Study:
        where = self._storage_path(ctx)
        if where is None:
            storage = None
        elif self.storage == "journal":
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            storage = JournalStorage(JournalFileBackend(where))
        else:
            storage = where
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        directions = [OBJECTIVES[o] for o in objectives]
        try:
            study = optuna.create_study(storage=storage, study_name=STUDY, directions=directions, load_if_exists=True)
        except ValueError as exc:  # directions of an existing study differ
            raise PetlsearchError(f"cannot resume the optuna study in {where}: {exc}") from exc
        meta = {"encoding": enc.signature(), "objectives": list(objectives)}
        old = {k: study.user_attrs[k] for k in meta if k in study.user_attrs}
        if old and old != meta:
            raise PetlsearchError(f"cannot resume the optuna study in {where}: it was made with {old}, "
                                  f"this search uses {meta} (other plugins, roles, grouping or objectives)")
        for k, v in meta.items():
            study.set_user_attr(k, v)
        with warnings.catch_warnings():  # experimental since optuna 3.2, unchanged through 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAMES[o] for o in objectives])  # what the dashboard plots
        return study

    def _sampler(self, optuna: Any, objectives: tuple[str, ...], startup: int, seed: int) -> Any:
        if not isinstance(self.sampler, str):
            return self.sampler
        kind = self.sampler
        if kind not in SAMPLERS:
            raise PetlsearchError(f"unknown sampler '{kind}'{did_you_mean(kind, SAMPLERS)}; "
                                  f"choose one of {', '.join(SAMPLERS)}")
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "nsga2" or (kind == "auto" and len(objectives) > 1):
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, startup))
        with warnings.catch_warnings():  # multivariate / group are flagged experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # multivariate + group: the encoding is conditional (a group's dims exist only when it is on)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True)

    def _pruner(self, optuna: Any, objectives: tuple[str, ...], startup: int, ctx: SearchContext) -> Any:
        if not isinstance(self.pruner, (str, type(None))):
            return self.pruner
        kind = self.pruner or "none"
        if kind not in PRUNERS:
            raise PetlsearchError(f"unknown pruner '{kind}'{did_you_mean(kind, PRUNERS)}; "
                                  f"choose one of {', '.join(PRUNERS)}")
        if kind == "none" or len(objectives) > 1:
            return optuna.pruners.NopPruner()
        if not ctx.fidelity.eval_every:
            log.warning("optuna: pruner '%s' has nothing to act on: the fidelity evaluates only at the end "
                        "(set eval_every)", kind)
        if kind == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=max(1, ctx.fidelity.eval_every),
                                                  max_resource=ctx.fidelity.steps, reduction_factor=3)
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)


def parse_objectives(spec: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """The objective names of a `objectives` option ("score,params" or a sequence), checked against OBJECTIVES."""
    names = tuple(s.strip() for s in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    bad = [n for n in names if n not in OBJECTIVES]
    if bad or not names or names[0] != "score" or len(set(names)) != len(names):
        raise PetlsearchError(f"objectives {list(names)} are not valid: use ('score',), ('score', 'params') "
                              f"or ('score', 'memory'){did_you_mean(bad[0], OBJECTIVES) if bad else ''}")
    return names


def _reporter(trial: optuna.Trial) -> Callable[..., bool]:
    """The trainer's report(step, score, loss) -> prune? callback, feeding `trial_value` to the
    trial's pruner."""
    seen: set[int] = set()

    def report(step: int, score: float, loss: float | None = None) -> bool:
        if step in seen:  # an early stop re-reports the last step
            return False
        seen.add(step)
        trial.report(trial_value(score, loss), step)
        return trial.should_prune()

    return report


def _tell(optuna: Any, study: optuna.Study, trial: Any, record: TrialRecord, objectives: tuple[str, ...],
          ctx: SearchContext) -> None:
    """Tell optuna how the trial ended; the record rides along for resume and the Pareto front, and
    readable attributes (the structure, its parameter count, the scores) for optuna-dashboard."""
    trial.set_user_attr("record", record.to_dict())
    for key, value in dashboard_attrs(record).items():
        trial.set_user_attr(key, value)
    study.tell(trial, **_ending(optuna, record, objectives, ctx))


def dashboard_attrs(record: TrialRecord) -> dict[str, Any]:
    """What a person reading the study wants per trial: `structure` ('lora(rank=1,alpha=2) @
    encoder.L5.attn.o:weight; ...'), `params`, the validation score and loss, the learning-rate scale."""
    placements = (f"{p.plugin}({','.join(f'{k}={v}' for k, v in p.config.items())}) @ {p.site}"
                  for p in record.structure())
    out: dict[str, Any] = {"params": record.params, "status": record.status, "structure": "; ".join(placements)}
    if record.score is not None:
        out["val score"] = record.score
    if record.metrics.get("loss") is not None:
        out["val loss"] = record.metrics["loss"]
    if "lr_scale" in record.train:
        out["lr scale"] = record.train["lr_scale"]
    return out


def _ending(optuna: Any, record: TrialRecord, objectives: tuple[str, ...], ctx: SearchContext) -> dict[str, Any]:
    State = optuna.trial.TrialState
    if record.status == "failed":
        return {"state": State.FAIL}
    if record.status == "pruned":
        return {"state": State.PRUNED}
    return {"state": State.COMPLETE, "values": [_value(o, record, ctx) for o in objectives]}


def _value(objective: str, record: TrialRecord, ctx: SearchContext) -> float:
    if objective == "score":  # the validation loss ranks trials (see rank_key)
        return trial_value(float(record.score), record.metrics.get("loss"))
    if objective == "params":
        return float(record.params)
    if record.memory is not None:
        return float(record.memory)
    return float(ctx.space.memory(record.structure(), ctx.shape))


def _finished(study: optuna.Study) -> int:
    """Trials that count toward n_trials: those that ended with a record (not rejected, not cut off)."""
    return sum(1 for t in study.trials if t.state.is_finished() and "record" in t.user_attrs)


def _records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.from_dict(t.user_attrs["record"]) for t in study.trials
            if t.state.is_finished() and "record" in t.user_attrs]


def _recover(optuna: Any, study: optuna.Study, ctx: SearchContext, objectives: tuple[str, ...]) -> None:
    """Settle the trials a crash left RUNNING (this search is their only writer).

    Each is closed as FAIL without a record, so it does not count. If its record reached
    trials.jsonl before the crash, the trial had finished: a copy holding that record is added to the
    study, without training. Otherwise it was cut off: its parameters are queued to run again.
    """
    State = optuna.trial.TrialState
    running = study.get_trials(deepcopy=False, states=(State.RUNNING,))
    journal = ctx.finished() if running else {}
    for t in running:
        study.tell(t.number, state=State.FAIL, skip_if_finished=True)
        record = journal.get(t.number)
        if record is None:
            log.info("optuna: trial %d was cut off; it runs again", t.number)
            study.enqueue_trial(t.params)
            continue
        log.info("optuna: trial %d finished before the crash; restoring it from trials.jsonl", t.number)
        ending = _ending(optuna, record, objectives, ctx)
        steps = dict(t.intermediate_values) if len(objectives) == 1 else None
        study.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                  user_attrs={"record": record.to_dict()},
                                                  intermediate_values=steps, **ending))
