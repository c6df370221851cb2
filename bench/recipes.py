"""Recipes: the learning-rate sweep that chose each plugin's declared rate.

Each plugin named in SWEEP trains at its default size (every site, default config, as in the zoo)
on MiniLM / Rotten Tomatoes for 100 steps at batch 16 (seed 0, validation on 512 examples) at
each rate of its row; the head trains at the recipe's head rate (1e-2, or 1e-3 beside a side
network). The rate with the best validation accuracy (the validation loss breaks ties) is what
the plugin's `Recipe` declares, with this benchmark as its source. The test split is not read.
Finished runs are kept in results/raw/recipes-runs.jsonl, so an interrupted run resumes where it
stopped (about 40 minutes on 2 CPU cores with --jobs 2).
"""

from __future__ import annotations

import logging
from typing import Any

from bench.common import Options, Report, RunLog, Table
from bench.tasks import minilm_task, tiny_task

log = logging.getLogger(__name__)
NAME = "recipes"
TITLE = "Recipes: the learning rate of each plugin, swept on MiniLM / Rotten Tomatoes"
STEPS, BATCH, EVAL_EXAMPLES = 100, 16, 512
SMALL = (3e-3, 1e-2, 3e-2)  # few parameters, each moving little: Compacter, KAdaptation, SparseAdapter
TINY = (1e-2, 3e-2)  # a few thousand vectors' entries: BitFit, IA3, LayerNorm gains (3e-3 did not learn)
PROMPTS = (1e-1, 3e-1)  # soft prompts (Lester et al. train them at 0.3; 3e-2 stayed at the majority class)
SWEEP: dict[str, tuple[float, ...]] = {
    "bitfit": TINY, "ia3": TINY, "ln_tuning": TINY, "compacter_pp": (3e-3, *TINY),
    "compacter": (1e-3, *SMALL), "kadaptation": SMALL, "sparse_adapter": SMALL,  # Compacter's best was the lowest
    "prompt_tuning": PROMPTS, "vpt": PROMPTS, "attempt": PROMPTS,
    "hyperprompt": (3e-4, 1e-3, 3e-3), "prefix_tuning": (3e-4, 3e-3),
    "mam_adapter": (1e-4, 3e-4), "unified": (1e-4, 3e-4),
}
QUICK = {"lora": (1e-3, 1e-2), "bitfit": (1e-2,)}


def one_run(task: Any, name: str, lr: float, head_lr: float, steps: int, seed: int) -> dict[str, Any]:
    from bench import methods as M
    from petlsearch.runners.trainer import TrainConfig, train

    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=lr, head_lr=head_lr, seed=seed, device="cpu",
                      max_eval_examples=EVAL_EXAMPLES)
    prep = M.apply_plugin(M.fresh_model(task, seed), name, batches=task.batches("train", 32, seed=0))
    result = train(prep.model, task, prep.groups(cfg), cfg)
    return {"val": result.val["accuracy"], "val_loss": result.val["loss"], "trainable": prep.trainable}


def head_rate(name: str) -> float:
    from petlsearch.plugins import create_plugin
    from petlsearch.searchspace.recipe import HEAD_LR

    return create_plugin(name).recipe.head_lr or HEAD_LR


def run(opts: Options) -> Report:
    from petlsearch.plugins import list_plugins

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    task = tiny_task(128) if opts.quick else minilm_task()
    steps = opts.pick(3, STEPS, opts.steps)
    sweep = {k: v for k, v in (QUICK if opts.quick else SWEEP).items() if k in list_plugins()}
    journal = RunLog(opts.out / "raw" / f"{report.stem}-runs.jsonl")
    work = [(RunLog.key(sweep=name, lr=lr, head_lr=head_rate(name), steps=steps, batch=BATCH, seed=0,
                        task=task.name, model=task.model_name),
             lambda n=name, lr=lr: one_run(task, n, lr, head_rate(n), steps, 0))
            for name, rates in sweep.items() for lr in rates]
    values = iter(journal.run_all(work, opts.reverse))
    if opts.helper:
        return report
    table = Table(f"{task.model_name} on {task.name}: {steps} steps at batch {BATCH}, seed 0; validation accuracy "
                  "(loss) per learning rate", ["plugin", "trainable", "rates tried", "val acc per rate",
                                               "val loss per rate", "best rate"])
    best: dict[str, float] = {}
    for name, rates in sweep.items():
        rows = [next(values) for _ in rates]
        pick = max(range(len(rates)), key=lambda i: (rows[i]["val"], -rows[i]["val_loss"]))
        best[name] = rates[pick]
        table.add(name, rows[0]["trainable"], " / ".join(f"{r:g}" for r in rates),
                  " / ".join(f"{r['val']:.3f}" for r in rows), " / ".join(f"{r['val_loss']:.3f}" for r in rows),
                  f"{rates[pick]:g}")
    report.tables.append(table)
    report.data = {"best": best, "steps": steps}
    return report
