"""Pruning: a 32-trial Ray Tune search with ASHA against the same 32 trials trained to the end.

Both searches use the ray strategy on a local Ray of 2 CPUs (one CPU per trial, two trials at a
time), the same seed, space (LoRA, adapters, parallel adapters, BitFit, IA3), budget (0.1%) and
trial fidelity (24 steps at batch 8, an evaluation on 64 validation examples every 4 steps); one
runs ASHA (grace 4 steps, reduction factor 3), the other a FIFO scheduler that never stops a trial.
The figure is the search's wall time with ASHA over without (target < 0.5), beside the best
validation score each found and the steps each trained. The final retraining (one step) is not
part of the search time.
"""

from __future__ import annotations

from typing import Any

from bench.common import Options, Report, Table, Target
from bench.tasks import minilm_task, tiny_task

NAME = "pruning"
TITLE = "Pruning: Ray Tune with ASHA vs without, 32 trials on 2 CPUs"
PLUGINS = ("lora", "adapter", "parallel_adapter", "bitfit", "ia3")


def one_search(task: Any, scheduler: str, trials: int, fidelity: Any, seed: int) -> dict[str, Any]:
    from petlsearch.runners.search import search
    from petlsearch.runners.trainer import TrainConfig

    run = search(task=task, budget="0.1%", strategy="ray", plugins=PLUGINS, trials=trials, fidelity=fidelity,
                 final=TrainConfig(steps=1, batch_size=fidelity.batch_size, max_eval_examples=64, device="cpu"),
                 seed=seed, strategy_options={"scheduler": scheduler, "num_cpus": 2, "cpus_per_trial": 1,
                                              "grace_period": fidelity.eval_every, "reduction_factor": 3})
    history = run.search.history
    steps = sum(max((s for s, _ in r.intermediate), default=0) if r.status == "pruned" else fidelity.steps
                for r in history)
    return {"scheduler": scheduler, "seconds": run.search.seconds, "trials": len(history),
            "pruned": sum(r.status == "pruned" for r in history),
            "best_val": max((r.score for r in history if r.score is not None), default=float("nan")),
            "steps": steps}


def run(opts: Options) -> Report:
    from petlsearch.runners.trainer import TrainConfig

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    task = tiny_task(128) if opts.quick else minilm_task()
    trials = opts.pick(4, 32, opts.trials)
    fidelity = TrainConfig(steps=opts.pick(4, 24, opts.steps), batch_size=8, eval_every=opts.pick(2, 4),
                           max_eval_examples=64, device="cpu")
    rows = {s: one_search(task, s, trials, fidelity, seed=0) for s in ("fifo", "asha")}
    table = Table(f"{task.model_name} on {task.name}: {trials} trials of {fidelity.steps} steps (batch "
                  f"{fidelity.batch_size}), budget 0.1%, local Ray with 2 CPUs",
                  ["scheduler", "search wall s", "trials", "stopped early", "steps trained", "best val acc"])
    for r in rows.values():
        table.add(r["scheduler"], r["seconds"], r["trials"], r["pruned"], r["steps"], r["best_val"])
    report.tables.append(table)
    ratio = rows["asha"]["seconds"] / rows["fifo"]["seconds"]
    report.targets.append(Target(f"{trials}-trial Ray search, ASHA / no pruning (wall time)", ratio,
                                 0.5, "<", "x"))
    report.data = {"runs": rows, "ratio": ratio}
    if opts.quick:
        report.notes.append("Quick mode: a tiny random BERT, 4 trials of 4 steps: the ratio means nothing.")
    return report
