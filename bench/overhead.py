"""Overhead: what petlsearch's hooks and engine cost beside Hugging Face peft and the bare model.

1. Training step (forward, backward, AdamW step) of petlsearch's LoRA and IA3 against peft's on
   the same modules of the real all-MiniLM-L6-v2, batch 32 x 64 tokens; the two models train
   alternately in one process; the figure is the median of the per-round ratios (target <= 1.05).
   Then the FISH mask (its default density, 0.5% of each weight, on every site) against BitFit
   (every bias) on the same model and batch, interleaved (target <= 1.3).
2. Inference forward of a model carrying every candidate of the default search space (LoRA,
   adapters, parallel adapters, BitFit, IA3 at every site) with every gate at 0, against the bare
   model (target <= 1.02); with 0-dim tensor gates (a differentiable search) for information.
3. Per-trial engine overhead: the real trial path (SearchContext.evaluate -> run_trial: model
   copy, graph, plugin clones, attach, optimizer, journal record) with training and evaluation
   replaced by nothing, plus sampling the structure (target < 0.5 s).
"""

from __future__ import annotations

import copy
import logging
import random
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from bench import methods as M
from bench.common import Options, Report, Table, Target, interleave, median, paired_ratio, spread, timed
from bench.tasks import fixed_batch, minilm_task, tiny_task
from petlsearch.searchspace.graph import ModelGraph

log = logging.getLogger(__name__)
NAME = "overhead"
TITLE = "Overhead: petlsearch vs peft and the bare model"
GATED_PLUGINS = ("lora", "adapter", "parallel_adapter", "bitfit", "ia3")
LORA_ROLES = ("attn.q", "attn.v")  # peft's default LoRA targets for BERT


def _train_step(prep: M.Prepared, batch: dict[str, Any], amp: bool = False) -> Any:
    """One AdamW step of `prep` on `batch` (under bf16 autocast with `amp`); on CUDA it waits for
    the device, so that a timer reads the step."""
    optimizer = torch.optim.AdamW(prep.all_params(), lr=1e-4)
    device = next(prep.model.parameters()).device

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = prep.model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def step_ratios(base: torch.nn.Module, batch: dict[str, Any], rounds: int, inner: int,
                table: Table, amp: bool = False) -> dict[str, float]:
    """petlsearch / peft step time for LoRA (q, v) and IA3 (k, v, FFN), interleaved (bf16
    autocast with `amp`), on the device of `base` and `batch`."""
    ratios = {}
    for kind, ours, theirs in (
        ("lora", lambda m: M.apply_plugin(m, "lora", roles=LORA_ROLES), lambda m: M.apply_peft(m, "lora", LORA_ROLES)),
        ("ia3", lambda m: M.apply_plugin(m, "ia3"), lambda m: M.apply_peft(m, "ia3")),
    ):
        a, b = ours(copy.deepcopy(base)), theirs(copy.deepcopy(base))
        if a.trainable != b.trainable:
            raise RuntimeError(f"{kind}: petlsearch trains {a.trainable} parameters, peft {b.trainable}")
        times = interleave({"petlsearch": _train_step(a, batch, amp), "peft": _train_step(b, batch, amp)}, rounds,
                           inner)
        ratio, dev = paired_ratio(times["petlsearch"], times["peft"])
        ratios[kind] = ratio
        table.add(kind, a.trainable, median(times["petlsearch"]) * 1e3, median(times["peft"]) * 1e3,
                  ratio, dev, len(times["peft"]))
    return ratios


def sparse_ratio(base: torch.nn.Module, task: Any, batch: dict[str, Any], rounds: int, inner: int,
                 table: Table) -> float:
    """FISH mask / BitFit training step time, interleaved."""
    fish = M.apply_plugin(copy.deepcopy(base), "fish_mask", batches=task.batches("train", 16, seed=0))
    bitfit = M.apply_plugin(copy.deepcopy(base), "bitfit")
    times = interleave({"fish_mask": _train_step(fish, batch), "bitfit": _train_step(bitfit, batch)}, rounds, inner)
    ratio, dev = paired_ratio(times["fish_mask"], times["bitfit"])
    table.add("fish_mask / bitfit", f"{fish.trainable:,} / {bitfit.trainable:,}", median(times["fish_mask"]) * 1e3,
              median(times["bitfit"]) * 1e3, ratio, dev, len(times["bitfit"]))
    return ratio


def gate_zero_ratio(base: torch.nn.Module, batch: dict[str, Any], rounds: int, inner: int, table: Table) -> float:
    """Forward time with every default-space candidate attached at gate 0 / bare forward."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    bare = copy.deepcopy(base).eval()
    gated = copy.deepcopy(base).eval()
    graph = ModelGraph.from_model(gated)
    modules = [m for name in GATED_PLUGINS for m in M.apply_plugin(gated, name, graph=graph).modules]
    with torch.no_grad():
        def forward(model: torch.nn.Module) -> Any:
            return lambda: model(**inputs)

        out = {}
        for label, gate in (("float 0.0", 0.0), ("tensor(0.)", torch.tensor(0.0))):
            for m in modules:
                m.gate = gate
            times = interleave({"gated": forward(gated), "bare": forward(bare)}, rounds, inner)
            ratio, dev = paired_ratio(times["gated"], times["bare"])
            out[label] = ratio
            table.add(label, len(modules), median(times["gated"]) * 1e3, median(times["bare"]) * 1e3, ratio, dev)
    return out["float 0.0"]


def trial_overhead(task: Any, trials: int, table: Table) -> float:
    """Median seconds of one trial without training: sample + SearchContext.evaluate(run_trial)."""
    from petlsearch.plugins import create_plugins
    from petlsearch.runners.trainer import TrainConfig, TrainResult, make_optimizer
    from petlsearch.runners.trial import run_trial
    from petlsearch.searchspace.budget import Budget
    from petlsearch.searchspace.space import SearchSpace
    from petlsearch.strategies.base import SearchContext

    def no_training(model: Any, task: Any, groups: Any, cfg: TrainConfig, **_: Any) -> TrainResult:
        make_optimizer(groups, cfg)  # building the optimizer is engine work, the steps are not
        return TrainResult(0, 0.0, {"accuracy": 0.5}, [], 0.0, 0.0)

    space = SearchSpace.from_graph(ModelGraph.from_model(task.make_model()), create_plugins(GATED_PLUGINS))
    budget, cfg = Budget.parse("0.1%"), TrainConfig(steps=1)
    samples, evals, totals = [], [], []
    with tempfile.TemporaryDirectory() as tmp, mock.patch("petlsearch.runners.trial.train", no_training):
        ctx = SearchContext(space, budget, task, cfg, trials, out_dir=Path(tmp),
                            objective=lambda pl, report: run_trial(task, pl, space.plugins, cfg, report=report))
        ctx.evaluate(-1, space.sample(random.Random(-1), budget))  # warm-up: first deepcopy, imports
        for i in range(trials):
            t_sample, placements = timed(lambda i=i: space.sample(random.Random(i), budget))
            t_eval, _ = timed(lambda: ctx.evaluate(i, placements))
            samples.append(t_sample)
            evals.append(t_eval)
            totals.append(t_sample + t_eval)
    for label, xs in (("sample a structure", samples), ("evaluate without training", evals), ("per trial", totals)):
        table.add(label, median(xs), spread(xs), len(xs))
    return median(totals)


def run(opts: Options) -> Report:
    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    rounds = opts.pick(3, 9, opts.repeats)
    inner = opts.pick(1, 3)
    if opts.quick:  # a tiny random BERT: the mechanics, not MiniLM's figures
        task, (batch, seq) = tiny_task(), (8, 32)
    else:
        task, (batch, seq) = minilm_task(), (32, 64)
    base = task.make_model()
    data = fixed_batch(task, batch, seq)
    where = f"{task.model_name}, batch {batch} x {seq} tokens, {rounds} interleaved rounds of {inner} calls"
    steps = Table(f"Training step, petlsearch / peft ({where})",
                  ["method", "trainable (no head)", "petlsearch ms", "peft ms", "ratio (median)", "+-", "rounds"])
    ratios = step_ratios(base, data, rounds, inner, steps)
    sparse = Table(f"Sparse training step: FISH mask / BitFit ({where})",
                   ["methods", "trainable (no head)", "FISH ms", "BitFit ms", "ratio (median)", "+-", "rounds"])
    fish_ratio = sparse_ratio(base, task, data, rounds, inner, sparse)
    gates = Table(f"Inference forward with every default-space candidate at gate 0 / bare model ({where})",
                  ["gate", "modules", "gated ms", "bare ms", "ratio (median)", "+-"])
    gate_ratio = gate_zero_ratio(base, data, rounds, inner, gates)
    engine = Table(f"Engine work per trial without training ({task.model_name}, default plugins, budget 0.1%)",
                   ["part", "median s", "+-", "trials"])
    per_trial = trial_overhead(task, opts.pick(3, 10, opts.trials), engine)
    report.tables += [steps, sparse, gates, engine]
    report.targets += [Target("LoRA training step, petlsearch / peft", ratios["lora"], 1.05, unit="x"),
                       Target("IA3 training step, petlsearch / peft", ratios["ia3"], 1.05, unit="x"),
                       Target("FISH mask training step / BitFit's", fish_ratio, 1.3, unit="x"),
                       Target("forward at gate 0 / bare model", gate_ratio, 1.02, unit="x"),
                       Target("engine overhead per trial", per_trial, 0.5, "<", " s")]
    report.notes += ["Ratios are medians of per-round ratios (A and B run alternately in one process); "
                     "+- is half the inter-quartile range of those ratios.",
                     "Tensor gates (a differentiable search) compute every module and multiply by the gate, "
                     "so their ratio is the cost of the supernet, not an overhead target."]
    if opts.quick:
        report.notes.append("Quick mode: a tiny random BERT and few rounds; the figures are not MiniLM's.")
    report.data = {"step_ratios": ratios, "fish_bitfit_ratio": fish_ratio, "gate_zero_ratio": gate_ratio, "per_trial_s": per_trial}
    return report
