"""The whole loop behind `petlsearch search` and `petlsearch.search()`: task -> graph -> space ->
strategy -> retrain the best structure at full fidelity -> run folder (structure, weights, report,
pictures, journal).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from petlsearch.errors import BudgetError, PetlsearchError
from petlsearch.files import LOCK_NAME, RunFolderLock, write_text
from petlsearch.plugins.registry import create_plugins
from petlsearch.runners import report as pictures
from petlsearch.runners.tasks import DEFAULT_TASK, Task, get_task
from petlsearch.runners.trainer import TrainConfig
from petlsearch.runners.trial import (
    HEAD_RATES,
    TRAINING,
    TrialOutcome,
    beats,
    pick_head_rate,
    run_trial,
    trivial_baselines,
)
from petlsearch.searchspace.budget import Budget
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.space import SearchSpace
from petlsearch.searchspace.structure import Structure
from petlsearch.smoke import NOTICE, smoke
from petlsearch.strategies.base import LR_SCALES, SearchContext, SearchResult, TrialRecord, get_strategy

log = logging.getLogger(__name__)
DEFAULT_PLUGINS = ("lora", "adapter", "parallel_adapter", "bitfit", "ia3")
# Sized so that the default run (MiniLM, Rotten Tomatoes, 4 trials) finishes within 10 minutes on
# 2 CPU cores: a MiniLM training step at batch 16 costs about 0.8 s there.
SEARCH_FIDELITY = TrainConfig(steps=30, batch_size=16, eval_every=15, max_eval_examples=512)
FINAL_FIDELITY = TrainConfig(steps=250, batch_size=16, eval_every=0)


@dataclass
class RunResult:
    search: SearchResult
    structure: Structure
    final: TrialOutcome
    out_dir: Path | None
    files: dict[str, str] = field(default_factory=dict)


def search(model: str | None = None, task: str | Task = DEFAULT_TASK, budget: str | Budget | None = "0.01%",
           memory_budget: str | None = None, strategy: str = "s3pet", plugins: Sequence[str] = DEFAULT_PLUGINS,
           trials: int = 4, out: str | Path | None = None, resume: bool = False, seed: int = 0,
           include_head: bool = False, roles: Sequence[str] | None = None, layers: Sequence[int] | None = None,
           fidelity: TrainConfig | None = None, final: TrainConfig | None = None, timeout: float | None = None,
           strategy_options: dict[str, Any] | None = None, progress: Any = None,
           on_final_step: Any = None, search_lr: bool | None = None, max_length: int | None = None,
           run_config: dict[str, Any] | None = None, text_column: str = "text",
           label_column: str = "label", auto_head_lr: bool = False) -> RunResult:
    """Search a structure for `model` on `task` under `budget`, retrain it, and write the run folder.

    Every module trains at its plugin's recipe; the black-box strategies (random, optuna, ray)
    also search a learning-rate scale of the recipes (`search_lr`; by default unless `fidelity`
    fixes the rate with `lr` or `lr_scale`), which the final retraining uses and the structure's
    `train` section records. The final result is compared with the trivial baselines (majority
    class, head only); a structure that does not beat them is reported as such.
    `progress(message)` receives one line per phase and trial; `on_final_step(advance=1)` is called
    after each step of the final retraining (a progress bar's update). `run_config` is written to the
    run folder as run.yaml (the CLI's options, so that `petlsearch search --config` repeats the run).
    `text_column` / `label_column` name the columns of a file task (csv:PATH, jsonl:PATH).
    `auto_head_lr` first picks the new head's rate (`trial.pick_head_rate`: the head alone at each of
    `HEAD_RATES` for the final run's steps, best on validation), which every trial, the final run and
    the head-only baseline then use.

    >>> result = petlsearch.search(budget="0.1%", strategy="random", trials=4)  # doctest: +SKIP
    >>> result.structure.save("structure.yaml")                                 # doctest: +SKIP
    """
    capped = smoke()
    trials = min(trials, capped.trials) if capped else trials
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget, memory_budget, include_head)
    strat = get_strategy(strategy, **(strategy_options or {}))  # bad names fail before any loading
    fidelity = fidelity or replace(SEARCH_FIDELITY, seed=seed)
    final = final or replace(FINAL_FIDELITY, seed=seed)
    if search_lr is None:
        search_lr = fidelity.lr is None and fidelity.lr_scale == 1.0
    with ExitStack() as owned:
        if out is not None:  # one process owns a run folder (a second fails, naming the owner)
            owned.enter_context(RunFolderLock(out))
        out_dir = _prepare_out(out, resume, {"model": model, "task": task if isinstance(task, str) else task.name,
                                             "budget": budget.to_dict(), "strategy": strategy, "plugins": list(plugins),
                                             "trials": trials, "seed": seed, "search_lr": search_lr,
                                             **({"auto_head_lr": True} if auto_head_lr else {})}, run_config)
        say = progress or (lambda msg: log.info("%s", msg))

        def warn(msg: str) -> None:
            if progress is not None:
                progress(f"warning: {msg}")
            else:
                log.warning("%s", msg)

        if capped:
            warn(NOTICE)
        t0 = time.monotonic()
        if not isinstance(task, Task):
            task = get_task(task, model, seed=seed, text_column=text_column, label_column=label_column,
                            **({"max_length": max_length} if max_length else {}))
        graph = ModelGraph.from_model(task.make_model())
        space = SearchSpace.from_graph(graph, create_plugins(plugins), roles=roles, layers=layers)
        budget = budget.bind(space.backbone_params, space.head_params if task.new_head else 0)  # once, for all
        limit = budget.limit
        if not space.candidates:
            raise PetlsearchError(f"no site of plugins {list(plugins)} matches roles={roles} layers={layers}")
        if limit is not None and min(c.min_cost for c in space.candidates) > limit:
            cheapest = min(space.candidates, key=lambda c: c.min_cost)
            left = f" ({max(limit, 0):,} left beside the head)" if budget.include_head else ""
            raise BudgetError(f"budget {budget.describe()} is too small{left}: the cheapest candidate "
                              f"({cheapest.key}) needs {cheapest.min_cost:,} parameters")
        size = space.size()
        say(f"{task.model_name} on {task.name}: {space.backbone_params:,} backbone parameters; budget "
            f"{budget.describe()}; {size.candidates} candidates, 10^{size.log10_structures:.0f} structures")
        head_rates: dict[float, float] = {}
        if auto_head_lr:
            say(f"picking the head's rate: the head alone for {final.steps} steps at each of "
                + ", ".join(f"{r:g}" for r in HEAD_RATES))
            rate, head_rates = pick_head_rate(task, replace(final, max_eval_examples=fidelity.max_eval_examples),
                                              say=say)
            say(f"head rate {rate:g} for every trial, the final run and the head-only baseline")
            fidelity, final = replace(fidelity, head_lr=rate), replace(final, head_lr=rate)
        shape = BatchShape(fidelity.batch_size, task.max_length)

        def objective(placements: Any, report: Any, train: dict[str, float] | None = None) -> TrialOutcome:
            return run_trial(task, placements, space.plugins, with_train(fidelity, train), report=report)

        ctx = SearchContext(space, budget, task, fidelity, trials, seed, out_dir, timeout, shape, objective, say,
                            lr_scales=LR_SCALES if search_lr else None, training=TRAINING)
        found = strat.run(ctx)
        ctx.check_fits(found.best)  # never return an over-budget structure
        if not distinguished(found.history):
            warn(f"the search's {len(found.history)} trials all scored {found.history[0].score:.4f} ({task.metric}) on "
                 "validation: that score could not tell structures apart, their validation loss ranked them; give "
                 "trials more --steps for a clearer ranking")
        final = with_train(final, found.train)
        say(f"search done in {found.seconds:.0f}s; retraining the best structure ({space.count(found.best):,} parameters"
            + (f", lr x{final.lr_scale:.3g}" if found.train else "") + ")")
        weights = out_dir / "weights.safetensors" if out_dir else None
        outcome = run_trial(task, found.best, space.plugins, final, test=True, weights_path=weights,
                            progress=on_final_step)
        say(f"baselines: the majority class and the head alone trained for the same {final.steps} steps"
            if task.new_head else "baseline: the pretrained model as it is")
        scores = trivial_baselines(task, final)
        baselines = {name: s[task.metric] for name, s in scores.items()}
        learned = beats(outcome.test, scores, task.metric)
        _judge(outcome.test.get(task.metric, float("nan")), baselines, task.metric, learned, say, warn)
        if "perplexity" in outcome.test and "pretrained" in scores:
            say(f"test perplexity {scores['pretrained']['perplexity']:.2f} pretrained -> "
                f"{outcome.test['perplexity']:.2f} with the structure")
        result = {"trainable_params": space.count(found.best), "head_params": outcome.head_params,
                  "backbone_params": space.backbone_params, "val": outcome.metrics, "test": outcome.test,
                  "metric": task.metric, "strategy": strategy, "seed": seed, "trials": len(found.history),
                  "search_seconds": round(found.seconds, 1), "total_seconds": round(time.monotonic() - t0, 1),
                  "baselines": baselines, "beats_baselines": learned, **({"smoke": True} if capped else {}),
                  **({"head_rates": {f"{r:g}": v for r, v in head_rates.items()}} if head_rates else {}),
                  **({"pretrained": scores["pretrained"]} if "pretrained" in scores else {})}
        if budget.memory is not None:
            result["memory_estimate"] = space.memory(found.best, shape)
        structure = space.structure(found.best, budget, name=task.model_name, result=result)
        structure.train = train_section(final, task.max_length)
        files = _write_run(out_dir, structure, found, space, limit) if out_dir else {}
        say(f"test {task.metric} {outcome.test.get(task.metric, float('nan')):.4f} with {result['trainable_params']:,} "
            f"trainable parameters (+{outcome.head_params:,} head)")
        per_task = {k.rsplit("/", 1)[0]: v for k, v in outcome.test.items() if k.endswith(f"/{task.metric}")}
        if per_task:  # a mixture: its score is the mean of these
            say(f"test {task.metric} per task: " + ", ".join(f"{k} {v:.4f}" for k, v in per_task.items()))
        return RunResult(found, structure, outcome, out_dir, files)


def _judge(test: float, baselines: dict[str, float], metric: str, learned: bool, say: Any, warn: Any) -> None:
    """Say the baselines; warn when the structure's test score does not beat them."""
    if not baselines:
        return
    say("baselines on the test split: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in baselines.items()))
    best = max(baselines, key=baselines.get)
    if not learned:
        warn(f"the structure's test {metric} {test:.4f} does not beat {best.replace('_', ' ')} ({baselines[best]:.4f}):"
             " nothing was learned beyond the trivial baseline; try more --final-steps, another --lr (e.g. --lr 3x "
             "or --lr 0.3x), or more --trials")


def with_train(cfg: TrainConfig, train: dict[str, float] | None) -> TrainConfig:
    """`cfg` with a trial's searched training settings applied (its lr_scale multiplies cfg's)."""
    if not train:
        return cfg
    return replace(cfg, lr_scale=cfg.lr_scale * float(train.get("lr_scale", 1.0)))


def train_section(cfg: TrainConfig, max_length: int) -> dict[str, Any]:
    """What a structure file records of how it was trained, so that `petlsearch train` repeats it."""
    keys = ("steps", "batch_size", "lr", "lr_scale", "head_lr", "weight_decay", "warmup")
    return {**{k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}, "max_length": max_length}


def distinguished(history: Sequence[TrialRecord]) -> bool:
    """False when two or more trials completed and every one got the same score: the trials were too
    short (or their evaluation too small) to rank the structures."""
    scores = {r.score for r in history if r.status == "complete" and r.score is not None}
    done = sum(1 for r in history if r.status == "complete")
    return done < 2 or len(scores) > 1


def _prepare_out(out: str | Path | None, resume: bool, args: dict[str, Any],
                 run_config: dict[str, Any] | None = None) -> Path | None:
    """Create the run folder; an existing one needs --resume and the same arguments (the number of
    trials may grow: resuming with more trials extends the search)."""
    if out is None:
        return None
    out = Path(out)
    meta = out / "run.json"
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not resume:
            raise PetlsearchError(f"output folder {out} exists; pass --resume to continue it or choose another --out")
        if meta.exists():
            old = json.loads(meta.read_text())
            diff = {k: (old.get(k), v) for k, v in args.items() if old.get(k) != v and k != "trials"}
            if diff:
                raise PetlsearchError(f"cannot resume {out}: arguments differ from the first run: {diff}")
    out.mkdir(parents=True, exist_ok=True)
    write_text(meta, json.dumps(args, indent=2, default=str))
    if run_config is not None:
        import yaml

        write_text(out / "run.yaml", yaml.safe_dump(run_config, sort_keys=False))
    return out


def _write_run(out: Path, structure: Structure, found: SearchResult, space: SearchSpace,
               limit: int | None) -> dict[str, str]:
    files = {"structure": str(structure.save(out / "structure.yaml"))}
    counts = [space.count([p]) for p in structure.placements]
    files["structure_png"] = str(pictures.structure_heatmap(
        structure.placements, counts, out / "structure.png", f"{structure.backbone.name}: {sum(counts):,} parameters",
        layers=sorted({b.layer for b in space.graph.blocks})))
    files["search_curve"] = str(pictures.search_curve(found.history, out / "search_curve.png", f"{found.strategy} search",
                                                      curve=found.extras.get("curve", ())))
    files["pareto"] = str(pictures.pareto_plot(found.history, found.pareto, out / "pareto.png", limit))
    report = {"result": structure.result, "best": [asdict(p) for p in found.best],
              "pareto": [r.to_dict() for r in found.pareto], "history": [r.to_dict() for r in found.history],
              "extras": found.extras}
    write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    files["report"] = str(out / "report.json")
    return files
