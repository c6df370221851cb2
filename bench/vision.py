"""Vision: EfficientNet-Lite0 (ImageNet weights) on Fashion-MNIST with convolution-ready methods.

Full fine-tuning, a linear probe (the new head alone), BitFit (the BatchNorm shifts: the
convolutions have no bias) and LoRA on the 32 1x1 convolutions train on the same splits, steps
and seeds (images resized to 64 x 64). The head is new and trained in full by every method, so
LoRA on the head would add nothing. Then, if the tip_adapter plugin is registered, Tip-Adapter
few-shot (1, 4, 16 shots per class): the training-free cache alone (head zeroed), a linear probe
trained on the shots, and the probe with the cache beside it; each cache also as Tip-Adapter-F
(its keys trained on the shots for the probe's number of steps, everything else frozen). Skipped, saying so, when
Fashion-MNIST is not installed (`apt-get install dataset-fashion-mnist`).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import replace
from typing import Any

import numpy as np

from bench import methods as M
from bench.common import Options, Report, RunLog, Table, std

log = logging.getLogger(__name__)
NAME = "vision"
TITLE = "Vision: EfficientNet-Lite0 on Fashion-MNIST"
# this CNN trains every method at one rate (the run's lr, which replaces the plugins' recipes, as
# --lr 2e-3 does): the rates these figures were measured at, on EfficientNet-Lite0
FULL_LR, PETL_LR, HEAD_LR = 1e-3, 2e-3, 2e-3
KEYS_LR = 1e-3  # Tip-Adapter-F's learning rate for the cache keys (the paper's)
METHODS = {
    "full fine-tuning": lambda m: M.full_finetuning(m),
    "linear probe": lambda m: M.head_only(m),
    "bitfit (BatchNorm)": lambda m: M.apply_plugin(m, "bitfit"),
    "lora (1x1 convs)": lambda m: M.apply_plugin(m, "lora", roles=("conv",)),
}


def train_eval(task: Any, prep: M.Prepared, cfg: Any) -> dict[str, Any]:
    from petlsearch.runners.trainer import evaluate, train

    result = train(prep.model, task, prep.groups(cfg), cfg) if cfg.steps else None
    test = evaluate(prep.model, task, "test")
    return {"trainable": prep.trainable, "test": test["accuracy"],
            "step_s": result.step_seconds if result else 0.0, "val": result.val["accuracy"] if result else float("nan")}


def methods_table(task: Any, steps: int, seeds: int, batch: int, journal: RunLog,
                  reverse: bool = False) -> tuple[Table, dict[str, list]]:
    from petlsearch.runners.trainer import TrainConfig
    from petlsearch.searchspace.graph import ModelGraph

    backbone = ModelGraph.from_model(task.make_model()).num_parameters()
    work, labels = [], []
    for label, setup in METHODS.items():
        lr = FULL_LR if label == "full fine-tuning" else PETL_LR
        for seed in range(seeds):
            cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, head_lr=HEAD_LR, seed=seed, device="cpu")
            work.append((RunLog.key(method=label, images=len(task.splits.y_train), **cfg.to_dict()),
                         lambda setup=setup, cfg=cfg: train_eval(task, setup(M.fresh_model(task, cfg.seed)), cfg)))
            labels.append(label)
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, value in zip(labels, journal.run_all(work, reverse)):
        runs.setdefault(label, []).append(value)
    full = statistics.median(r["step_s"] for r in runs["full fine-tuning"])
    table = Table(f"EfficientNet-Lite0 on Fashion-MNIST ({len(task.splits.y_train)} training images, {steps} steps, "
                  f"{seeds} seed(s))",
                  ["method", "trainable", "% of backbone", "test acc", "+- (std)", "step / full FT"])
    for label, rs in runs.items():
        accs = [r["test"] for r in rs]
        table.add(label, rs[0]["trainable"], 100 * rs[0]["trainable"] / backbone, statistics.fmean(accs),
                  std(accs),
                  statistics.median(r["step_s"] for r in rs) / full if full else float("nan"))
    return table, runs


def few_shot(task: Any, shots: int, seed: int) -> Any:
    """The task with `shots` training images per class (validation and test unchanged)."""
    from petlsearch.runners import data as D

    s = task.splits
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(s.y_train == c))[:shots]
                                  for c in range(len(s.classes))]))
    splits = D.Splits(s.x_train[idx], s.y_train[idx], s.x_val, s.y_val, s.x_test, s.y_test, s.classes)
    return replace(task, splits=splits)


def with_cache(model: Any, small: Any, shots: int, finetune: bool, cfg: Any) -> float:
    """Test accuracy of a copy of `model` with a Tip-Adapter cache of `shots` per class beside its
    head; with `finetune` (Tip-Adapter-F) the cache keys alone are then trained on the shots."""
    import copy

    from petlsearch.plugins import create_plugin
    from petlsearch.runners.trainer import evaluate, train
    from petlsearch.searchspace.graph import ModelGraph

    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    plugin = create_plugin("tip_adapter", max_shots=shots)
    plugin.prepare(model, small.batches("train", 64))
    site = plugin.sites(ModelGraph.from_model(model))[0]
    cache = plugin.attach(model, site, plugin.config(site, {"shots": shots, "finetune_keys": finetune}))
    if finetune:
        from petlsearch.runners.trainer import ParamGroup

        train(model, small, [ParamGroup("tip_adapter keys", [cache.cache_keys], KEYS_LR)], cfg)
    return evaluate(model, small, "test")["accuracy"]


def tip_adapter(task: Any, shot_list: tuple[int, ...], steps: int) -> Table:
    """Cache alone and probe + cache, training-free and -F, beside the probe, for each number of shots."""
    import torch

    from petlsearch.runners.trainer import TrainConfig

    table = Table("Tip-Adapter few-shot (test accuracy; -F: cache keys trained, head kept)",
                  ["shots / class", "cache alone", "cache-F alone", "linear probe", "probe + cache",
                   "probe + cache-F"])
    for shots in shot_list:
        small = few_shot(task, shots, 0)
        cfg = TrainConfig(steps=steps, batch_size=min(32, len(small.splits.y_train)), lr=PETL_LR, head_lr=HEAD_LR,
                          device="cpu")
        zero_head = M.head_only(small.make_model())  # no classifier: the cache's logits alone
        with torch.no_grad():
            for p in zero_head.head:
                p.zero_()
        probe = M.head_only(small.make_model())
        probe_acc = train_eval(small, probe, cfg)["test"]
        table.add(shots, with_cache(zero_head.model, small, shots, False, cfg),
                  with_cache(zero_head.model, small, shots, True, cfg), probe_acc,
                  with_cache(probe.model, small, shots, False, cfg), with_cache(probe.model, small, shots, True, cfg))
    return table


def run(opts: Options) -> Report:
    from petlsearch.errors import TaskError
    from petlsearch.plugins import list_plugins
    from petlsearch.runners.tasks import get_task

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    limit = opts.pick(200, 6000)
    try:
        task = get_task("fashion_mnist", "efficientnet-lite0", limit=limit, image_size=opts.pick(32, 64))
    except TaskError as exc:
        report.skipped = str(exc)
        log.warning("vision: skipped: %s", exc)
        return report
    steps, seeds = opts.pick(2, 150, opts.steps), opts.pick(1, 3, opts.seeds)
    journal = RunLog(opts.out / "raw" / f"{report.stem}-runs.jsonl")
    table, runs = methods_table(task, steps, seeds, opts.pick(16, 32), journal, opts.reverse)
    if opts.helper:  # the few-shot table is the main process's
        return report
    report.tables.append(table)
    report.data["runs"] = runs
    if "tip_adapter" in list_plugins():
        report.tables.append(tip_adapter(task, opts.pick((1,), (1, 4, 16)), opts.pick(2, 100)))
    else:
        report.notes.append("The tip_adapter plugin is not registered: no few-shot table.")
    report.notes.append("The test split is a stratified subset of Fashion-MNIST's 10,000 test images "
                        "(limit / 6), the training split a stratified subset of `limit` images.")
    if opts.quick:
        report.notes.append("Quick mode: 200 images at 32 x 32, 2 steps: the accuracies mean nothing.")
    return report
