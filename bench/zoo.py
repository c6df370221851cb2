"""Zoo: every registered plugin trained for real on MiniLM / Rotten Tomatoes, beside the baselines.

Each plugin at its default size (all of its sites, default config), full fine-tuning, the head
alone, LoRA of rank 1 on q and v (VQT's size, for the issue's size-matched comparison), and
Hugging Face peft's LoRA, IA3 (on the same modules as ours) and prompt tuning (20 tokens, as
ours) train on the same splits, for the same steps, with the same seeds (batch 16, AdamW, linear
decay; each method at its plugin's recipe (`Plugin.recipe`, peft's methods at the recipe of our
plugin of the same name), the new head at the recipe's head rate (1e-2 unless declared), full
fine-tuning at 5e-5; validation on 512 examples, test on the whole split). Reported:
trainable parameters (% of the backbone, head excluded), test accuracy (mean and standard
deviation over seeds), the median step time and the measured training memory (one step,
petlsearch.searchspace.measure.measure), both as ratios to full fine-tuning's. Expensive: the full
run is 30-odd methods x 3 seeds x 100 steps (about an hour on 2 CPU cores); finished runs are
kept in results/raw/zoo-runs.jsonl, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import methods as M
from bench.common import Options, Report, RunLog, Table, Target, mib, plt, std
from bench.tasks import minilm_task, tiny_task

log = logging.getLogger(__name__)
NAME = "zoo"
TITLE = "Zoo: every plugin trained on MiniLM / Rotten Tomatoes"
EVAL_EXAMPLES = 512  # validation only; the test split is always whole
QUICK_PLUGINS = ("lora", "bitfit")
# the issue compares LST and VQT with LoRA at a similar parameter count: LoRA at its default size
# (rank 8 on every projection) is LST's size; rank 1 on q and v in every layer is VQT's
SIZE_MATCHED = {"lst": "lora", "vqt": "lora q,v r1"}
FULL, HEAD_ONLY = "full fine-tuning", "head only"  # the baselines' labels


def method_table(quick: bool) -> dict[str, Callable[[Any, Any], M.Prepared]]:
    """label -> setup(model, task): every plugin, then the baselines."""
    from petlsearch.plugins import list_plugins

    names = QUICK_PLUGINS if quick else list_plugins()
    out: dict[str, Callable[[Any, Any], M.Prepared]] = {
        FULL: lambda m, t: M.full_finetuning(m),
        HEAD_ONLY: lambda m, t: M.head_only(m),
    }
    for name in names:
        out[name] = lambda m, t, name=name: M.apply_plugin(m, name, batches=t.batches("train", 32, seed=0))
    if not quick:
        out["lora q,v r1"] = lambda m, t: M.apply_plugin(m, "lora", roles=("attn.q", "attn.v"), config={"rank": 1})
    for kind in ("lora",) if quick else M.PEFT_KINDS:
        out[f"peft {kind}"] = lambda m, t, kind=kind: M.apply_peft(m, kind)
    return out


def recipe_of(label: str) -> dict[str, Any] | None:
    """The recipe a method trains at (part of its runs' keys: a new recipe is a new run)."""
    from petlsearch.plugins import create_plugin, list_plugins

    if label == FULL:
        return M.FULL_FINETUNING.to_dict()
    name = label.split()[0] if label.split()[0] in list_plugins() else label.removeprefix("peft ")
    return create_plugin(name).recipe.to_dict() if name in list_plugins() else None


def train_method(task: Any, setup: Callable[[Any, Any], M.Prepared], cfg: Any, with_memory: bool) -> dict[str, Any]:
    """One run: a fresh model, the method, (memory of one step on a copy), training, test accuracy."""
    from petlsearch.runners.trainer import evaluate, train
    from petlsearch.searchspace.measure import measure

    prep = setup(M.fresh_model(task, cfg.seed), task)
    memory = None
    if with_memory:
        batch = next(task.batches("train", cfg.batch_size, seed=cfg.seed))
        memory = measure(copy.deepcopy(prep.model), batch).total
    result = train(prep.model, task, prep.groups(cfg), cfg)
    test = evaluate(prep.model, task, "test")
    return {"trainable": prep.trainable, "head": sum(p.numel() for p in prep.head), "val": result.val["accuracy"],
            "test": test["accuracy"], "step_s": result.step_seconds, "memory": memory}


def run(opts: Options) -> Report:
    from petlsearch.runners.trainer import TrainConfig
    from petlsearch.searchspace.graph import ModelGraph

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    task = tiny_task(128) if opts.quick else minilm_task()
    steps, seeds = opts.pick(3, 100, opts.steps), opts.pick(1, 3, opts.seeds)
    batch = 16
    journal = RunLog(opts.out / "raw" / f"{report.stem}-runs.jsonl")
    backbone = ModelGraph.from_model(task.make_model()).num_parameters()
    runs: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    methods = list(method_table(opts.quick).items())
    for label, setup in reversed(methods) if opts.reverse else methods:
        for seed in range(seeds):
            cfg = TrainConfig(steps=steps, batch_size=batch, seed=seed, device="cpu", max_eval_examples=EVAL_EXAMPLES)
            key = RunLog.key(method=label, task=task.name, model=task.model_name, recipe=recipe_of(label),
                             **cfg.to_dict())
            try:
                row = journal.run(key, lambda: train_method(task, setup, cfg, with_memory=seed == 0))
                log.info("zoo: %s seed %d: %s", label, seed, row)
                runs.setdefault(label, []).append(row)
            except Exception as exc:  # a plugin without sites on BERT, or one that fails, is listed
                failed[label] = f"{type(exc).__name__}: {str(exc)[:100]}"
                runs.pop(label, None)
                log.warning("zoo: %s failed: %s", label, failed[label])
                break
    if opts.helper:
        return report
    runs = {label: runs[label] for label, _ in methods if label in runs}  # the table's order either way
    table = summarise(runs, backbone, task, steps)
    report.tables.append(table)
    if not opts.quick:
        report.targets += targets(runs)
    report.plots.append(str(plot(runs, backbone, opts.out / f"{report.stem}.png")))
    if failed:
        rows = [[k, v] for k, v in failed.items()]
        report.tables.append(Table("Methods that did not run", ["method", "reason"], rows))
    report.data = {"runs": runs, "failed": failed, "backbone_params": backbone, "steps": steps, "seeds": seeds}
    if opts.quick:
        report.notes.append("Quick mode: a tiny random BERT on 128 snippets, a few steps: accuracies are chance-level.")
    return report


def targets(runs: dict[str, list[dict[str, Any]]]) -> list[Target]:
    """Issue targets read off the zoo: LST and VQT within 3 points of LoRA at a similar parameter
    count. (FISH's step against BitFit's is timed interleaved in `overhead`: runs here may be
    hours apart, under other loads.)"""
    def acc(label: str) -> float:
        return statistics.fmean(r["test"] for r in runs[label]) if label in runs else float("nan")

    def size(label: str) -> str:
        return f"{runs[label][0]['trainable']:,}" if label in runs else "?"

    return [Target(f"{m} ({size(m)} params) test accuracy - {ref}'s ({size(ref)} params), points",
                   100 * (acc(m) - acc(ref)), -3.0, ">=") for m, ref in SIZE_MATCHED.items()]


def summarise(runs: dict[str, list[dict[str, Any]]], backbone: int, task: Any, steps: int) -> Table:
    """One row per method: its seeds' mean and spread; the memory columns only where a run measured it."""
    full = runs.get(FULL, [{}])[0]
    with_memory = any(rs[0]["memory"] for rs in runs.values())
    table = Table(f"{task.model_name} on {task.name}: {steps} steps; ratios to full fine-tuning",
                  ["method", "seeds", "trainable", "% of backbone", "test acc", "+- (std)", "val acc", "step / full FT",
                   *(["memory MiB", "memory / full FT"] if with_memory else [])])
    for label, rs in runs.items():
        accs = [r["test"] for r in rs]
        step = statistics.median(r["step_s"] for r in rs)
        memory = rs[0]["memory"]
        memory_cells = [mib(memory or 0), memory / full["memory"] if full.get("memory") else float("nan")]
        table.add(label, len(rs), rs[0]["trainable"], 100 * rs[0]["trainable"] / backbone, statistics.fmean(accs),
                  std(accs), statistics.fmean(r["val"] for r in rs),
                  step / full["step_s"] if full.get("step_s") else float("nan"), *(memory_cells if with_memory else []))
    return table


def plot(runs: dict[str, list[dict[str, Any]]], backbone: int, path: Path) -> Path:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    for label, rs in runs.items():
        x = max(100 * rs[0]["trainable"] / backbone, 1e-4)
        ys = [r["test"] for r in rs]
        peft = label.startswith("peft")
        ax.errorbar(x, statistics.fmean(ys), yerr=std(ys), fmt="s" if peft else "o",
                    color="tab:orange" if peft else "tab:gray" if label in (FULL, HEAD_ONLY) else "tab:blue", ms=5)
        ax.annotate(label, (x, statistics.fmean(ys)), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, % of the backbone (head excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_title("PETL zoo: accuracy vs size", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
    return path
