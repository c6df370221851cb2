"""Recipes: the learning-rate sweep that chose each plugin's declared rate.

Each plugin named in SWEEP trains at its default size (every site, default config, as in the zoo)
on MiniLM / Rotten Tomatoes for 100 steps at batch 16 (seed 0, validation on 512 examples) at
each rate of its row; the head trains at the recipe's head rate (1e-2, or 1e-3 beside a side
network). The rate with the best validation accuracy (the validation loss breaks ties) is what
the plugin's `Recipe` declares, with this benchmark as its source. The test split is not read.
Finished runs are kept in results/raw/recipes-runs.jsonl, so an interrupted run resumes where it
stopped (about 40 minutes on 2 CPU cores with --jobs 2).

Beside it, the head's rate: the head alone and the plugins in HEAD_SWEEP (the slow learners of
the zoo's 100 steps, and two fast ones) at each rate of HEAD_RATES, each plugin at its recipe rate,
on the same split (validation only): whether a new head of 770 weights on the frozen pooler is
what holds the 100-step runs near the majority class.
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
HEAD_ONLY = "head only"
HEAD_RATES = (1e-2, 3e-2, 1e-1)  # 1e-2: HEAD_LR, the rate every row of the zoo's head trains at
HEAD_SWEEP = (HEAD_ONLY, "prompt_tuning", "vpt", "compacter", "compacter_pp", "bitfit", "ia3", "lora")
QUICK_HEAD_SWEEP = (HEAD_ONLY, "bitfit")


def one_run(task: Any, name: str, lr: float, head_lr: float, steps: int, seed: int) -> dict[str, Any]:
    from bench import methods as M
    from petlsearch.runners.trainer import TrainConfig, train

    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=lr, head_lr=head_lr, seed=seed, device="cpu",
                      max_eval_examples=EVAL_EXAMPLES)
    model = M.fresh_model(task, seed)
    prep = M.head_only(model) if name == HEAD_ONLY else M.apply_plugin(model, name,
                                                                        batches=task.batches("train", 32, seed=0))
    result = train(prep.model, task, prep.groups(cfg), cfg)
    return {"val": result.val["accuracy"], "val_loss": result.val["loss"], "trainable": prep.trainable}


def recipe_rate(name: str) -> float | None:
    from petlsearch.plugins import create_plugin

    return None if name == HEAD_ONLY else create_plugin(name).recipe.lr


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
    heads = [n for n in (QUICK_HEAD_SWEEP if opts.quick else HEAD_SWEEP) if n == HEAD_ONLY or n in list_plugins()]
    pairs = [(name, lr, head_rate(name)) for name, rates in sweep.items() for lr in rates]
    head_pairs = [(name, recipe_rate(name), h) for name in heads for h in HEAD_RATES]
    work = [(RunLog.key(sweep=name, lr=lr, head_lr=h, steps=steps, batch=BATCH, seed=0, task=task.name,
                        model=task.model_name),
             lambda n=name, lr=lr, h=h: one_run(task, n, lr, h, steps, 0))
            for name, lr, h in pairs + head_pairs]
    values = iter(journal.run_all(work, opts.reverse))
    if opts.helper:
        return report
    table = Table(f"{task.model_name} on {task.name}: {steps} steps at batch {BATCH}, seed 0; validation accuracy "
                  "(loss) per learning rate", ["plugin", "trainable", "rates tried", "val acc per rate",
                                               "val loss per rate", "best rate"])
    best: dict[str, float] = {}
    for name, rates in sweep.items():
        rows = [next(values) for _ in rates]
        best[name] = sweep_row(table, name, rows[0]["trainable"], rates, rows)
    report.tables.append(table)
    head_table, head_best = head_rate_table(heads, [next(values) for _ in head_pairs], steps)
    report.tables.append(head_table)
    report.data = {"best": best, "head_best": head_best, "steps": steps}
    return report


def head_rate_table(names: list[str], rows: list[dict[str, Any]], steps: int) -> tuple[Table, dict[str, float]]:
    """Validation accuracy (loss) of each of `names` at each head rate; `rows` in (name, rate) order."""
    table = Table(f"The head's rate: {steps} steps at batch {BATCH}, seed 0, each plugin at its recipe rate; "
                  "validation accuracy (loss) per head rate", ["method", "rate", "head rates tried",
                                                               "val acc per head rate", "val loss per head rate",
                                                               "best head rate"])
    best: dict[str, float] = {}
    k = len(HEAD_RATES)
    for i, name in enumerate(names):
        rate = recipe_rate(name)
        best[name] = sweep_row(table, name, "" if rate is None else f"{rate:g}", HEAD_RATES, rows[i * k:(i + 1) * k])
    return table, best


def sweep_row(table: Table, name: str, second: Any, rates: tuple[float, ...], rows: list[dict[str, Any]]) -> float:
    """Add `name`'s row (one run per rate) to `table`; the rate with the best validation accuracy,
    the validation loss breaking ties."""
    pick = max(range(len(rates)), key=lambda i: (rows[i]["val"], -rows[i]["val_loss"]))
    table.add(name, second, " / ".join(f"{r:g}" for r in rates), " / ".join(f"{r['val']:.3f}" for r in rows),
              " / ".join(f"{r['val_loss']:.3f}" for r in rows), f"{rates[pick]:g}")
    return rates[pick]
