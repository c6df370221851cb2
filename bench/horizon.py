"""Horizon: how many training steps the slow learners of the zoo need on MiniLM.

In the zoo's 100 steps prompt tuning and ATTEMPT stay at the majority class at every rate their
papers and the recipes sweep suggest, and VPT, HyperPrompt, Compacter and Compacter++ stay within 3
points of the head alone. Here each trains at its recipe for HORIZON steps
(batch 16, the linear decay over the whole run, seed 0) beside the head alone, with the validation
accuracy on 512 examples every EVERY steps and the test accuracy at the end: the step at which a
method first leaves the majority class (validation accuracy 2 points above it) and the one at which
it first passes head-only's validation accuracy at that step. Finished runs are kept in
results/raw/horizon-runs.jsonl (one run per method: about an hour on 2 CPU cores with --jobs 2).
"""

from __future__ import annotations

import logging
from typing import Any

from bench.common import Options, Report, RunLog, Table, Target, plt
from bench.tasks import minilm_task, tiny_task

log = logging.getLogger(__name__)
NAME = "horizon"
TITLE = "Horizon: the steps the slow learners need on MiniLM / Rotten Tomatoes"
HORIZON, EVERY, BATCH, EVAL_EXAMPLES = 1000, 100, 16, 512
HEAD_ONLY = "head only"
METHODS = (HEAD_ONLY, "prompt_tuning", "attempt", "hyperprompt", "vpt", "compacter", "compacter_pp")
LEAVES_MAJORITY = 0.02  # validation accuracy this far above the majority class counts as learning


def one_run(task: Any, method: str, steps: int, every: int, seed: int) -> dict[str, Any]:
    from bench import methods as M
    from petlsearch.runners.trainer import TrainConfig, evaluate, train

    cfg = TrainConfig(steps=steps, batch_size=BATCH, eval_every=every, seed=seed, device="cpu",
                      max_eval_examples=EVAL_EXAMPLES)
    model = M.fresh_model(task, seed)
    prep = M.head_only(model) if method == HEAD_ONLY else M.apply_plugin(model, method,
                                                                       batches=task.batches("train", 32, seed=0))
    result = train(prep.model, task, prep.groups(cfg), cfg)
    curve = [[h["step"], h["accuracy"], h["loss"]] for h in result.history]
    return {"curve": curve, "test": evaluate(prep.model, task, "test")["accuracy"], "trainable": prep.trainable,
            "step_s": result.step_seconds}


def first_step(curve: list[list[float]], above: dict[int, float] | float) -> int | None:
    """The first evaluated step whose validation accuracy beats `above` (a number, or one per step)."""
    for step, acc, _ in curve:
        bar = above if isinstance(above, float) else above.get(int(step), float("inf"))
        if acc > bar:
            return int(step)
    return None


def run(opts: Options) -> Report:
    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    task = tiny_task(128) if opts.quick else minilm_task()
    steps = opts.pick(4, HORIZON, opts.steps)
    every = opts.pick(2, EVERY)
    methods = (HEAD_ONLY, "prompt_tuning") if opts.quick else METHODS
    journal = RunLog(opts.out / "raw" / f"{report.stem}-runs.jsonl")
    work = [(RunLog.key(horizon=m, recipe=_recipe(m), steps=steps, every=every, batch=BATCH, seed=0,
                        task=task.name, model=task.model_name),
             lambda m=m: one_run(task, m, steps, every, 0)) for m in methods]
    runs = dict(zip(methods, journal.run_all(work, opts.reverse)))
    if opts.helper:
        return report
    majority = task.majority_score("val", EVAL_EXAMPLES)  # on the examples the curves read
    head = {int(s): a for s, a, _ in runs[HEAD_ONLY]["curve"]}
    table = Table(f"{task.model_name} on {task.name}: {steps} steps at batch {BATCH}, seed 0, each at its recipe; "
                  f"validation accuracy every {every} steps (majority class {majority:.3f})",
                  ["method", "trainable", "val acc at steps " + ", ".join(str(int(s)) for s, _, _ in
                                                                         runs[HEAD_ONLY]["curve"]),
                   "leaves the majority class at step", "passes head only at step", f"test acc at {steps}"])
    for m, r in runs.items():
        table.add(m, r["trainable"], " ".join(f"{a:.3f}" for _, a, _ in r["curve"]),
                  first_step(r["curve"], majority + LEAVES_MAJORITY) or "never",
                  "" if m == HEAD_ONLY else first_step(r["curve"], head) or "never", r["test"])
    report.tables.append(table)
    if not opts.quick:
        report.targets += [Target(f"{m} test accuracy at {steps} steps - head only's, points",
                                  100 * (runs[m]["test"] - runs[HEAD_ONLY]["test"]), 3.0, ">=")
                           for m in methods if m != HEAD_ONLY]
    report.plots.append(str(_plot(runs, majority, opts.out / f"{report.stem}.png")))
    report.data = {"runs": runs, "majority_val": majority, "steps": steps, "every": every}
    if opts.quick:
        report.notes.append("Quick mode: a tiny random BERT on 128 snippets, a few steps: accuracies are chance-level.")
    return report


def _recipe(method: str) -> dict[str, Any] | None:
    from petlsearch.plugins import create_plugin

    return None if method == HEAD_ONLY else create_plugin(method).recipe.to_dict()


def _plot(runs: dict[str, dict[str, Any]], majority: float, path: Any) -> Any:
    p = plt()
    fig, ax = p.subplots(figsize=(6.5, 3.8))
    for m, r in runs.items():
        ax.plot([s for s, _, _ in r["curve"]], [a for _, a, _ in r["curve"]], marker="o", ms=3, label=m,
                color="black" if m == HEAD_ONLY else None, ls="--" if m == HEAD_ONLY else "-")
    ax.axhline(majority, color="gray", lw=0.8, ls=":", label="majority class")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (512 examples)")
    ax.legend(fontsize=7)
    ax.set_title("the slow learners against the head alone, one run of each", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    p.close(fig)
    return path
