"""Fidelity: does a short search trial rank structures as their full training does?

Twelve random structures under 0.1% of MiniLM, drawn from the default space (LoRA, adapters,
parallel adapters, BitFit, IA3) with a learning-rate scale each, as the random strategy draws them
(SearchSpace.sample, SearchContext.sample_train). Each trains twice with the product's settings:
at the search fidelity (runners.search.SEARCH_FIDELITY: its steps, its validation sample) and at
the final length (FINAL_FIDELITY), after which the test split is scored. Reported: the Spearman
rank correlation between each trial score (validation accuracy; accuracy with the loss as
tie-break; minus the validation loss, which the strategies rank by) and the final test accuracy.
Finished runs are kept in results/raw/fidelity-runs.jsonl, so an interrupted run resumes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, replace
from typing import Any

from bench.common import Options, Report, RunLog, Table, Target
from bench.tasks import minilm_task, tiny_task

log = logging.getLogger(__name__)
NAME = "fidelity"
TITLE = "Fidelity: the rank correlation of a search trial's score with the final test accuracy"
BUDGET = "0.1%"
STRUCTURES = 12
RHO_TARGET = 0.5
RANK = "minus validation loss (the strategies' rank, strategies.base.trial_value)"


def draws(space: Any, n: int) -> list[tuple[list[Any], dict[str, float]]]:
    """n (structure, train) pairs, each drawn as the random strategy draws trial i of seed 0."""
    from petlsearch.searchspace.budget import Budget
    from petlsearch.strategies.base import SearchContext

    budget = Budget.parse(BUDGET)
    ctx = SearchContext(space, budget, None, None)  # only its lr_scales are read
    out = []
    for i in range(n):
        rng = random.Random(f"fidelity:{i}")
        out.append((space.sample(rng, budget), ctx.sample_train(rng)))
    return out


def one_run(task: Any, space: Any, placements: list[Any], train: dict[str, float], cfg: Any,
            test: bool) -> dict[str, Any]:
    from petlsearch.runners.search import with_train
    from petlsearch.runners.trial import run_trial

    out = run_trial(task, placements, space.plugins, with_train(cfg, train), test=test)
    return {"val": out.score, "val_loss": out.metrics["loss"], "test": out.test.get("accuracy"),
            "params": out.params, "seconds": out.seconds}


def ordinal(keys: list[tuple[float, float]]) -> list[int]:
    """The rank of each key in lexicographic order (a tie-break as a number Spearman can read)."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    return [order.index(i) for i in range(len(keys))]


def spearman(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def run(opts: Options) -> Report:
    from petlsearch.plugins import create_plugins
    from petlsearch.runners.search import DEFAULT_PLUGINS, FINAL_FIDELITY, SEARCH_FIDELITY
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.space import SearchSpace

    from bench.search import fidelities

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    task = tiny_task(128) if opts.quick else minilm_task()
    trial_cfg = replace(SEARCH_FIDELITY, device="cpu")
    final_cfg = replace(FINAL_FIDELITY, steps=opts.pick(3, FINAL_FIDELITY.steps, opts.steps), device="cpu")
    if opts.quick:
        trial_cfg = replace(trial_cfg, steps=2, eval_every=1, max_eval_examples=32)
    pairs = {"the CLI's": (trial_cfg, final_cfg)}
    if not opts.quick:  # why Optuna and random do worse in the search benchmark than at the CLI's settings
        pairs["the search benchmark's"] = fidelities()
    space = SearchSpace.from_graph(ModelGraph.from_model(task.make_model()), create_plugins(DEFAULT_PLUGINS))
    structures = draws(space, opts.pick(3, STRUCTURES))
    journal = RunLog(opts.out / "raw" / f"{report.stem}-runs.jsonl")
    work = []
    for trial, final in pairs.values():
        for i, (placements, train) in enumerate(structures):
            for cfg, test in ((trial, False), (final, True)):
                key = RunLog.key(fidelity_structure=i, placements=[asdict(p) for p in placements], train=train,
                                 cfg=cfg.to_dict(), test=test, model=task.model_name, task=task.name)
                work.append((key, lambda p=placements, t=train, c=cfg, s=test: one_run(task, space, p, t, c, s)))
    values = journal.run_all(work, opts.reverse)
    if opts.helper:
        return report
    report.data = {"train": [t for _, t in structures]}
    for k, (label, (trial, final)) in enumerate(pairs.items()):
        part = values[2 * k * len(structures):2 * (k + 1) * len(structures)]
        rho = correlate(report, task, structures, part[0::2], part[1::2], trial, final, label)
        if k == 0:
            report.data.update(trials=part[0::2], finals=part[1::2], rho=rho, trial=trial.to_dict(),
                               final=final.to_dict())
            if not opts.quick:
                report.targets.append(Target("Spearman rho, the strategies' trial score vs final test accuracy",
                                             rho[RANK], RHO_TARGET, ">="))
        else:
            report.data[label] = {"trials": part[0::2], "finals": part[1::2], "rho": rho, "trial": trial.to_dict(),
                                  "final": final.to_dict()}
    return report


def correlate(report: Report, task: Any, structures: list[Any], trials: list[dict[str, Any]],
              finals: list[dict[str, Any]], trial: Any, final: Any, label: str) -> dict[str, float]:
    """The table of one (trial, final) fidelity pair and its rank correlations."""
    from petlsearch.strategies.base import trial_value

    table = Table(f"{task.model_name} on {task.name} at {BUDGET}, {label} fidelity: trial {trial.steps} steps "
                  f"(validation on {trial.max_eval_examples} examples) vs final {final.steps} steps",
                  ["structure", "placements", "params", "lr scale", "trial val acc", "trial val loss",
                   "final test acc"])
    for i, ((placements, train), t, f) in enumerate(zip(structures, trials, finals)):
        table.add(i, len(placements), f["params"], train.get("lr_scale", 1.0), t["val"], t["val_loss"], f["test"])
    test = [f["test"] for f in finals]
    rho = {"validation accuracy": spearman([t["val"] for t in trials], test),
           "accuracy, loss as tie-break": spearman(ordinal([(t["val"], -t["val_loss"]) for t in trials]), test),
           RANK: spearman([trial_value(t["val"], t["val_loss"]) for t in trials], test)}
    report.tables.append(table)
    report.tables.append(Table(f"Spearman rho of the trial score with the final test accuracy, {label} fidelity",
                               ["trial score", "rho"], [[k, v] for k, v in rho.items()]))
    return rho
