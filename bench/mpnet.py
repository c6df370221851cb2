"""MPNet: the classification methods on a 12-layer, 768-wide encoder (all-mpnet-base-v2).

The second classification backbone beside MiniLM (issue 21): full fine-tuning, the head alone,
LoRA (its default size, rank 8 on every projection: LST's size), LoRA of rank 1 on q and v (VQT's
size), Houlsby adapters, BitFit, IA3, LST, prompt tuning and VQT, each at its plugin's recipe on
Rotten Tomatoes, trained and evaluated as the zoo trains them (batch 16, AdamW, linear decay,
`bench.zoo.train_method`; validation on 256 examples, test on the whole split). The rows the
targets read (and head only, the baseline) run first, seed by seed, then the others, so that a
run stopped part way has the targets' figures first; finished runs are kept in results/raw/mpnet-runs.jsonl and an interrupted run resumes. On 2 CPU
cores a step of full fine-tuning takes about 11 s on one thread (LoRA 7 s, the head alone 3 s).
Then LST's and LoRA's training memory at batch 16 x 128 tokens against full fine-tuning's
(petlsearch.searchspace.measure.measure, one step on real snippets padded to 128 tokens).
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


def method_table(quick: bool) -> dict[str, Callable[[Any, Any], M.Prepared]]:
    """label -> setup(model, task)."""
    out: dict[str, Callable[[Any, Any], M.Prepared]] = {
        FULL: lambda m, t: M.full_finetuning(m),
        HEAD_ONLY: lambda m, t: M.head_only(m),
    }
    for name in ("lora", "lst") if quick else PLUGINS:
        out[name] = lambda m, t, name=name: M.apply_plugin(m, name, batches=t.batches("train", 32, seed=0))
    if not quick:
        out["lora q,v r1"] = lambda m, t: M.apply_plugin(m, "lora", roles=("attn.q", "attn.v"), config={"rank": 1})
    return out


def run(opts: Options) -> Report:
    from petlsearch.runners.trainer import TrainConfig
    from petlsearch.searchspace.graph import ModelGraph

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    task = mpnet_task(opts.quick)
    steps, seeds = opts.pick(3, 100, opts.steps), opts.pick(1, 3, opts.seeds)
    journal = RunLog(opts.out / "raw" / f"{report.stem}-runs.jsonl")
    backbone = ModelGraph.from_model(task.make_model()).num_parameters()
    methods = method_table(opts.quick)
    # one step each, a minute: before the hours of training, so that a stopped run has it
    memory = journal.run(RunLog.key(kind="memory", model=task.model_name, shape=MEMORY_SHAPE, quick=opts.quick),
                         lambda: lean_memory(task, opts.quick))
    work = []
    first = [label for label in methods if label in TARGET_ROWS]
    rest = [label for label in methods if label not in TARGET_ROWS]
    # the rows the targets read, seed by seed, then the others seed by seed
    for label, seed in [(lb, sd) for group in (first, rest) for sd in range(seeds) for lb in group]:
        cfg = TrainConfig(steps=steps, batch_size=16, seed=seed, device="cpu", max_eval_examples=EVAL_EXAMPLES)
        key = RunLog.key(method=label, task=task.name, model=task.model_name, recipe=recipe_of(label), **cfg.to_dict())
        work.append((label, key, functools.partial(train_method, task, methods[label], cfg, with_memory=False)))
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, key, compute in reversed(work) if opts.reverse else work:
        row = journal.run(key, compute)
        log.info("mpnet: %s: %s", label, row)
        runs.setdefault(label, []).append(row)
    if opts.helper:
        return report
    runs = {label: runs[label] for label in methods if label in runs}
    report.tables.append(summarise(runs, backbone, task, steps, seeds))
    report.tables.append(memory_table(memory))
    report.targets += targets(runs, memory)
    report.data = {"runs": runs, "memory": memory, "backbone_params": backbone, "steps": steps, "seeds": seeds}
    if opts.quick:
        report.notes.append("Quick mode: a tiny random BERT on 128 snippets, a few steps: accuracies are chance-level.")
    return report


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


def targets(runs: dict[str, list[dict[str, Any]]], memory: dict[str, int]) -> list[Target]:
    """LST within 3 points of LoRA at a similar size (and VQT of rank-1 LoRA), LST's memory <= 35%
    of full fine-tuning's (issue 21)."""
    def acc(label: str) -> float:
        return statistics.fmean(r["test"] for r in runs[label]) if label in runs else float("nan")

    def seeds(label: str) -> str:
        return f"{len(runs.get(label, []))} seed(s), +-{100 * std([r['test'] for r in runs.get(label, [])]):.1f}"

    out = [Target(f"{m} ({seeds(m)}) test accuracy - {ref}'s ({seeds(ref)}), points", 100 * (acc(m) - acc(ref)),
                  -3.0, ">=") for m, ref in SIZE_MATCHED.items()]
    out.append(Target(f"LST's training memory at {MEMORY_SHAPE[0]} x {MEMORY_SHAPE[1]}, % of full fine-tuning's",
                      100 * memory["lst"] / memory[FULL], 35.0, "<=", "%"))
    return out
