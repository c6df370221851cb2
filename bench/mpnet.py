"""MPNet: the classification methods on a 12-layer, 768-wide encoder (all-mpnet-base-v2).

The second classification backbone beside MiniLM (issue 21): full fine-tuning, the head alone,
LoRA (its default size, rank 8 on every projection: LST's size), LoRA of rank 1 on q and v (VQT's
size), Houlsby adapters, BitFit, IA3, LST, prompt tuning and VQT, each at its plugin's recipe on
Rotten Tomatoes (prompt tuning also at 3e-2, `AT_RATE`: its recipe's 0.3 fails here), trained and
evaluated as the zoo trains them (batch 16, AdamW, linear decay, `bench.zoo.train_method`;
validation on 256 examples, test on the whole split). The rows the targets read (and head only,
the baseline) run first, seed by seed, then the others, so that a run stopped part way has the
targets' figures first; finished runs are kept in results/raw/mpnet-runs.jsonl and an
interrupted run resumes. On 2 CPU cores a step of full fine-tuning takes about 11 s on one
thread (LoRA 7 s, the head alone 3 s). Beside them, S3PET at 0.01% and 0.1% over the search
benchmark's default space and fidelity (`bench.search`: a supernet of 5 x 20 steps, its structure
retrained for 100 steps), against the
best hand-made design that fits each budget (picked on seed 0's validation) and full fine-tuning,
3 seeds each (a row that no target reads runs at seed 0 only). And LST's and LoRA's training
memory at batch 16 x 128 tokens against full fine-tuning's (petlsearch.searchspace.measure.measure,
one step on real snippets padded to 128 tokens), measured first.
"""

from __future__ import annotations

import copy
import functools
import logging
import statistics
from collections.abc import Callable
from typing import Any

from bench import methods as M
from bench.common import Options, Report, RunLog, Table, Target, mib, std
from bench.zoo import FULL, HEAD_ONLY, recipe_of, summarise, train_method

log = logging.getLogger(__name__)
NAME = "mpnet"
TITLE = "MPNet: the classification methods on a 12-layer encoder"
EVAL_EXAMPLES = 256  # validation only; the test split is always whole
MAX_LENGTH = 64  # Rotten Tomatoes snippets: 27 tokens on average, 57 at most in the first 500
MEMORY_SHAPE = (16, 128)  # the LST paper's Table 1 setting
PLUGINS = ("lora", "adapter", "bitfit", "ia3", "lst", "prompt_tuning", "vqt")
SIZE_MATCHED = {"lst": "lora", "vqt": "lora q,v r1"}  # as the zoo: LST at LoRA's default size, VQT at rank 1 q,v
TARGET_ROWS = (FULL, HEAD_ONLY, "lora", "lst", "lora q,v r1", "vqt")  # what the targets and the baseline read
# label ("<plugin> at <rate>") -> the one rate its modules train at instead of the plugin's recipe (the
# run's --lr): prompt tuning's 0.3 (Lester et al.'s, with Adafactor) leaves MPNet at the minority class
AT_RATE = {"prompt_tuning at 3e-2": 3e-2}
BUDGETS = ("0.01%", "0.1%")
FULL_SHARE = {"0.01%": 97.0, "0.1%": 99.0}  # S3PET's test accuracy, % of full fine-tuning's (issue 21)


@functools.lru_cache(maxsize=2)
def mpnet_task(quick: bool = False) -> Any:
    """MPNet on Rotten Tomatoes (quick: a tiny random BERT on real snippets)."""
    from bench.tasks import rotten_tomatoes, tiny_task
    from petlsearch.runners.tasks import Task, text_encoder, text_model

    if quick:
        return tiny_task(128)
    splits = rotten_tomatoes(0)
    display, factory, tok = text_model("mpnet", len(splits.classes))
    return Task("rotten_tomatoes", "text", splits, display, factory, text_encoder(tok, MAX_LENGTH),
                max_length=MAX_LENGTH, tokenizer=tok)


def without_sites(graph: Any, names: tuple[str, ...]) -> dict[str, str]:
    """plugin -> why it cannot run on the model of `graph` (it offers no site there)."""
    from petlsearch.plugins import create_plugin

    return {n: f"no site on {graph.info.get('model_type', graph.family)}" for n in names
            if not create_plugin(n).sites(graph)}


def method_table(quick: bool, skip: dict[str, str] | None = None) -> dict[str, Callable[[Any, Any], M.Prepared]]:
    """label -> setup(model, task), without the plugins in `skip`."""
    out: dict[str, Callable[[Any, Any], M.Prepared]] = {
        FULL: lambda m, t: M.full_finetuning(m),
        HEAD_ONLY: lambda m, t: M.head_only(m),
    }
    for name in ("lora", "lst") if quick else PLUGINS:
        if name not in (skip or {}):
            out[name] = lambda m, t, name=name: M.apply_plugin(m, name, batches=t.batches("train", 32, seed=0))
    if not quick:
        out["lora q,v r1"] = lambda m, t: M.apply_plugin(m, "lora", roles=("attn.q", "attn.v"), config={"rank": 1})
        for label in AT_RATE:
            name = label.split()[0]
            out[label] = lambda m, t, name=name: M.apply_plugin(m, name)
    return out


def run(opts: Options) -> Report:
    from petlsearch.searchspace.graph import ModelGraph

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    task = mpnet_task(opts.quick)
    steps, seeds = opts.pick(3, 100, opts.steps), opts.pick(1, 3, opts.seeds)
    journal = RunLog(opts.out / "raw" / f"{report.stem}-runs.jsonl")
    graph = ModelGraph.from_model(task.make_model())
    backbone = graph.num_parameters()
    skipped = without_sites(graph, PLUGINS)  # VQT on MPNet: its queries would meet the relative position bias
    methods = method_table(opts.quick, skipped)
    budgets = opts.pick(["0.1%"], list(BUDGETS))
    # one step each, a minute: before the hours of training, so that a stopped run has it
    memory = journal.run(RunLog.key(kind="memory", model=task.model_name, shape=MEMORY_SHAPE, quick=opts.quick),
                         lambda: lean_memory(task, opts.quick))
    from bench.search import PLUGINS as SEARCH_PLUGINS
    from petlsearch.plugins import create_plugins
    from petlsearch.searchspace.space import SearchSpace

    space = SearchSpace.from_graph(graph, create_plugins(SEARCH_PLUGINS))  # the hand-made designs' space, built once
    zoo = functools.partial(zoo_work, task, methods, steps)
    search = functools.partial(search_work, task, opts.quick)
    # seed 0 of what the targets read, then their other seeds (the hand-made design picked on seed 0's
    # validation), then the other rows: a run stopped part way has the targets' figures first
    first = [label for label in methods if label in TARGET_ROWS]
    phase_a = [*zoo(first, [0]), *(w for b in budgets for w in search(b, [0])),
               *(w for b in budgets for w in hand_made(task, space, opts.quick, b, None, 0))]
    done = dict(zip((label for label, _, _ in phase_a), journal.run_all([w[1:] for w in phase_a], opts.reverse)))
    picked = {b: max((v for k, v in done.items() if k.startswith(f"hand-made {b}")), key=lambda r: r["val"],
                     default=None) for b in budgets}
    later = range(1, seeds)
    phase_b = [*zoo(first, later), *(w for b in budgets for w in search(b, later)),
               *(w for b, p in picked.items() if p is not None for sd in later
                 for w in hand_made(task, space, opts.quick, b, p["design"], sd))]
    phase_c = zoo([label for label in methods if label not in TARGET_ROWS], [0])  # no target reads their seeds
    values = [*done.values(), *journal.run_all([w[1:] for w in phase_b + phase_c], opts.reverse)]
    if opts.helper:
        return report
    labelled = list(zip((w[0] for w in [*phase_a, *phase_b, *phase_c]), values))
    runs = {label: [v for k, v in labelled if k == label] for label in methods}
    runs = {k: v for k, v in runs.items() if v}
    searches = {b: [v for k, v in labelled if k == f"s3pet {b}"] for b in budgets}
    designs = {b: [v for k, v in labelled if k == f"hand-made {b} {p['design']}"] if p else [] for b, p in picked.items()}
    report.tables.append(summarise(runs, backbone, task, steps))
    report.tables.append(search_table(searches, designs, runs.get(FULL, [])))
    report.tables.append(memory_table(memory))
    if skipped:
        report.tables.append(Table("Methods that did not run", ["method", "reason"], [[k, v] for k, v in skipped.items()]))
    report.targets += targets(runs, memory, skipped) + search_targets(searches, designs, runs.get(FULL, []))
    report.data = {"runs": runs, "skipped": skipped, "searches": searches, "hand_made": designs, "memory": memory,
                   "backbone_params": backbone, "steps": steps, "seeds": seeds}
    if opts.quick:
        report.notes.append("Quick mode: a tiny random BERT on 128 snippets, a few steps: accuracies are chance-level.")
    return report


def zoo_work(task: Any, methods: dict[str, Any], steps: int, labels: list[str],
             seeds: Any) -> list[tuple[str, str, Any]]:
    """(label, run-log key, compute) of each zoo row of `labels` at each seed, seed by seed."""
    from petlsearch.runners.trainer import TrainConfig

    out = []
    for seed in seeds:
        for label in labels:
            cfg = TrainConfig(steps=steps, batch_size=16, seed=seed, device="cpu", max_eval_examples=EVAL_EXAMPLES,
                              lr=AT_RATE.get(label))
            key = RunLog.key(method=label, task=task.name, model=task.model_name, recipe=recipe_of(label),
                             **cfg.to_dict())
            out.append((label, key, functools.partial(train_method, task, methods[label], cfg, with_memory=False)))
    return out


def search_work(task: Any, quick: bool, budget: str, seeds: Any) -> list[tuple[str, str, Any]]:
    """S3PET over the search benchmark's default space at its fidelity (bench.search): a supernet of
    (trials - 1) x 20 steps, its structure retrained for the zoo's 100 steps at batch 16."""
    from bench.search import PLUGINS, fidelities, one_search, recipes, strategy_defaults

    fidelity, final = fidelities(quick)
    trials = 2 if quick else 6
    return [(f"s3pet {budget}", RunLog.key(search="s3pet", model=task.model_name, budget=budget, trials=trials, seed=seed,
                                           plugins=PLUGINS, fidelity=fidelity.to_dict(), final=final.to_dict(),
                                           recipes=recipes(), **strategy_defaults("s3pet")),
             functools.partial(one_search, task, budget, "s3pet", trials, fidelity, final, seed)) for seed in seeds]


def hand_made(task: Any, space: Any, quick: bool, budget: str, design: str | None,
              seed: int) -> list[tuple[str, str, Any]]:
    """The search benchmark's hand-made designs that fit `budget` (only `design`, when given), on
    `space` (the search benchmark's default space on the task's backbone)."""
    import json

    from bench.search import HAND_MADE, fidelities, hand_made_work

    chosen = [d for d in HAND_MADE if design is None or d[0] == design]
    work = hand_made_work(task, space, budget, fidelities(quick)[1], chosen, seed)
    # the design's label is in its run-log key (hand_made_work keeps only the designs that fit)
    return [(f"hand-made {budget} {json.loads(key)['hand_made']}", key, compute) for key, compute in work]


def search_table(searches: dict[str, list[dict[str, Any]]], designs: dict[str, list[dict[str, Any]]],
                 full: list[dict[str, Any]]) -> Table:
    table = Table("S3PET against the best hand-made design (picked on seed 0's validation) and full fine-tuning, "
                  "100 steps each", ["budget", "method", "seeds", "trainable", "test acc", "+- (std)", "/ full FT"])
    full_acc = statistics.fmean(r["test"] for r in full) if full else float("nan")
    for budget, rs in searches.items():
        hand = designs.get(budget) or []
        for label, group in (("s3pet", rs), (f"best hand-made ({hand[0]['design']})" if hand else "", hand)):
            if group:
                accs = [r["test"] for r in group]
                table.add(budget, label, len(group), round(statistics.fmean(r["params"] for r in group)),
                          statistics.fmean(accs), std(accs), statistics.fmean(accs) / full_acc)
    return table


def search_targets(searches: dict[str, list[dict[str, Any]]], designs: dict[str, list[dict[str, Any]]],
                   full: list[dict[str, Any]]) -> list[Target]:
    """S3PET >= 99% (0.1%) and 97% (0.01%) of full fine-tuning, and >= the best hand-made design."""
    if not full:
        return []
    full_acc = statistics.fmean(r["test"] for r in full)
    out = []
    for budget, rs in searches.items():
        if not rs:
            continue
        acc = statistics.fmean(r["test"] for r in rs)
        out.append(Target(f"s3pet at {budget} ({len(rs)} seed(s)) / full fine-tuning ({len(full)}), test accuracy",
                          100 * acc / full_acc, FULL_SHARE[budget], ">=", "%"))
        if designs.get(budget):
            hand = statistics.fmean(r["test"] for r in designs[budget])
            out.append(Target(f"s3pet - best hand-made ({designs[budget][0]['design']}) test accuracy at {budget}, "
                              "points", 100 * (acc - hand), 0.0, ">="))
    return out


def padded_batch(task: Any, batch: int, seq: int) -> dict[str, Any]:
    """The first `batch` training snippets, tokenised by the task's tokenizer to exactly `seq` tokens."""
    import torch

    x, y = task.splits.split("train")
    enc = task.tokenizer(list(x[:batch]), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {**enc, "labels": torch.as_tensor(y[:batch])}


def lean_memory(task: Any, quick: bool) -> dict[str, int]:
    """Bytes of one training step at MEMORY_SHAPE (quick: 4 x 32) for full fine-tuning, LoRA and LST."""
    from petlsearch.searchspace.measure import measure

    batch = padded_batch(task, *((4, 32) if quick else MEMORY_SHAPE))
    setups = {FULL: lambda m: M.full_finetuning(m), "lora": lambda m: M.apply_plugin(m, "lora"),
              "lst": lambda m: M.apply_plugin(m, "lst", batches=task.batches("train", 32, seed=0))}
    out = {}
    for label, setup in setups.items():
        prep = setup(M.fresh_model(task, 0))
        out[label] = measure(copy.deepcopy(prep.model), batch).total
        log.info("mpnet: memory of %s at %s: %.0f MiB", label, MEMORY_SHAPE, mib(out[label]))
    return out


def memory_table(memory: dict[str, int]) -> Table:
    table = Table(f"Training memory of one step at {MEMORY_SHAPE[0]} x {MEMORY_SHAPE[1]} tokens",
                  ["method", "MiB", "/ full FT"])
    for label, total in memory.items():
        table.add(label, mib(total), total / memory[FULL])
    return table


def targets(runs: dict[str, list[dict[str, Any]]], memory: dict[str, int], skipped: dict[str, str]) -> list[Target]:
    """LST within 3 points of LoRA at a similar size (and VQT of rank-1 LoRA), LST's memory <= 35%
    of full fine-tuning's (issue 21)."""
    def acc(label: str) -> float:
        return statistics.fmean(r["test"] for r in runs[label]) if label in runs else float("nan")

    def seeds(label: str) -> str:
        return f"{len(runs.get(label, []))} seed(s), +-{100 * std([r['test'] for r in runs.get(label, [])]):.1f}"

    out = [Target(f"{m} ({seeds(m)}) test accuracy - {ref}'s ({seeds(ref)}), points", 100 * (acc(m) - acc(ref)),
                  -3.0, ">=") for m, ref in SIZE_MATCHED.items() if m not in skipped]
    out.append(Target(f"LST's training memory at {MEMORY_SHAPE[0]} x {MEMORY_SHAPE[1]}, % of full fine-tuning's",
                      100 * memory["lst"] / memory[FULL], 35.0, "<=", "%"))
    return out
