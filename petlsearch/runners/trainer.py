"""The training loop: AdamW with warm-up and linear decay, gradient accumulation, mixed precision on
CUDA, periodic evaluation with early stopping and pruning reports, seeded and deterministic on CPU.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petlsearch.runtime import pick_device, seed_everything, to_device
from petlsearch.searchspace.recipe import DEFAULT_RECIPE, HEAD_LR, Recipe
from petlsearch.smoke import smoke

if TYPE_CHECKING:
    from petlsearch.runners.tasks import Task
    from petlsearch.searchspace.graph import ModelGraph

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """How long and how to train; a trial at reduced fidelity uses fewer steps / a data fraction."""

    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "examples per step (before accumulation)"})
    lr: float | None = field(default=None, metadata={"help": "one learning rate for every module instead of "
                                                     "each plugin's recipe (None: the recipes)"})
    lr_scale: float = field(default=1.0, metadata={"help": "multiplies the modules' learning rates"})
    head_lr: float | None = field(default=None, metadata={"help": "learning rate of the task head (None: the "
                                                          "recipes', else HEAD_LR)"})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay of the modules "
                                                               "(None: each recipe's)"})
    warmup: float = field(default=0.06, metadata={"help": "fraction of steps of linear warm-up"})
    grad_accum: int = field(default=1, metadata={"help": "batches per optimizer step"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: at the end only)"})
    patience: int | None = field(default=None, metadata={"help": "stop after N evaluations without gain"})
    data_fraction: float = field(default=1.0, metadata={"help": "fraction of the training split used"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "cap on evaluated examples"})
    seed: int = field(default=0, metadata={"help": "seed of data order and initialisation"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    train_head: bool = field(default=True, metadata={"help": "train the task head with the modules"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ParamGroup:
    """Parameters that train at one rate: one plugin's modules, the head, or a baseline's weights."""

    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float = 0.0


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val: dict[str, float]
    history: list[dict[str, float]]
    seconds: float
    step_seconds: float
    pruned: bool = False
    stopped_early: bool = False


def head_parameters(model: nn.Module, graph: ModelGraph) -> list[nn.Parameter]:
    """Parameters of the task head (nodes with role 'head')."""
    params = []
    for node in graph.find(role="head"):
        params.extend(model.get_submodule(node.path).parameters(recurse=False))
    return params


def freeze_backbone(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def freeze_norm_statistics(model: nn.Module) -> None:
    """Keep BatchNorm-style running statistics fixed while training: they belong to the frozen
    backbone, and a structure file (with its safetensors weights) must reproduce the model exactly
    on a fresh copy of that backbone."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.eval()


def recipe_groups(by_plugin: dict[str, list[nn.Parameter]], recipes: dict[str, Recipe],
                  head: list[nn.Parameter], cfg: TrainConfig) -> list[ParamGroup]:
    """One group per plugin at its recipe's rate (or `cfg.lr`), times `cfg.lr_scale`, and the head's.

    The head trains at `cfg.head_lr`, else the lowest head rate a recipe of the structure declares
    (a side network trains with its head at one rate), else HEAD_LR; the scale leaves it alone.
    """
    groups = []
    for name, params in by_plugin.items():
        recipe = recipes.get(name, DEFAULT_RECIPE)
        base = cfg.lr if cfg.lr is not None else recipe.lr
        decay = cfg.weight_decay if cfg.weight_decay is not None else recipe.weight_decay
        groups.append(ParamGroup(name, params, base * cfg.lr_scale, decay))
    declared = [recipes[n].head_lr for n in by_plugin if n in recipes and recipes[n].head_lr is not None]
    head_lr = cfg.head_lr if cfg.head_lr is not None else min(declared, default=HEAD_LR)
    groups.append(ParamGroup("head", head, head_lr))
    return groups


def make_optimizer(groups: list[ParamGroup]) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay}
                              for g in groups if g.params])


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm = max(1, int(cfg.warmup * cfg.steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))
    return f


def evaluate(model: nn.Module, task: Task, split: str = "val", batch_size: int = 64,
             max_examples: int | None = None, device: torch.device | None = None) -> dict[str, float]:
    """Metrics of `model` on a split (see Task.evaluate)."""
    return task.evaluate(model, split, batch_size, max_examples, device)


def train(model: nn.Module, task: Task, groups: list[ParamGroup], cfg: TrainConfig,
          report: Callable[..., bool] | None = None,
          after_step: Iterable[Callable[[int], None]] = (), progress: Any = None) -> TrainResult:
    """Train `groups` (each at its own rate, see `recipe_groups`) of `model` on the task's training split.

    `report(step, score, loss=...)` (the task's metric and loss on the validation split) is called at each
    evaluation and returns True to prune the trial;
    `after_step` callbacks run after every optimizer step (S3PET's architecture step);
    `progress` is an optional rich Progress task handle updater `progress(advance=1)`.
    """
    capped = smoke()
    if capped is not None and cfg.steps > capped.steps:
        cfg = replace(cfg, steps=capped.steps)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device).train()
    freeze_norm_statistics(model)
    optimizer = make_optimizer(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    params = [p for g in groups for p in g.params]
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    batches = task.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed,
                           fraction=cfg.data_fraction, epochs=None)
    history: list[dict[str, float]] = []
    best, stale, losses, times = -math.inf, 0, [], []
    pruned = stopped = False
    start = time.perf_counter()
    step = 0
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        for _ in range(cfg.grad_accum):
            batch = to_device(next(batches), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model(**batch).loss / cfg.grad_accum
            loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {step}")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for callback in after_step:
            callback(step)
        losses.append(loss.item() * cfg.grad_accum)
        times.append(time.perf_counter() - t0)
        if progress is not None:
            progress(advance=1)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            val = evaluate(model, task, "val", max_examples=cfg.max_eval_examples, device=device)
            history.append({"step": step, "loss": statistics.fmean(losses[-cfg.eval_every:]), **val})
            if report is not None and report(step, val[task.metric], loss=val.get("loss")):
                pruned = True
                break
            if val[task.metric] > best:
                best, stale = val[task.metric], 0
            else:
                stale += 1
                if cfg.patience is not None and stale >= cfg.patience:
                    stopped = True
                    break
    val = evaluate(model, task, "val", max_examples=cfg.max_eval_examples, device=device)
    history.append({"step": step, "loss": statistics.fmean(losses[-10:]) if losses else math.nan, **val})
    if report is not None and not pruned:
        report(step, val[task.metric], loss=val.get("loss"))
    return TrainResult(step, history[-1]["loss"], val, history, time.perf_counter() - start,
                       statistics.median(times) if times else 0.0, pruned, stopped)
