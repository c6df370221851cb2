"""One trial: apply a structure to a fresh copy of the backbone, train it at a fidelity, score it.

Search trials score on the validation split; the final run of the best structure trains at full
fidelity and also reports the test split.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petlsearch.errors import PetlsearchError
from petlsearch.files import save_tensors
from petlsearch.runners.trainer import (
    ParamGroup,
    TrainConfig,
    TrainResult,
    evaluate,
    freeze_backbone,
    head_parameters,
    recipe_groups,
    train,
)
from petlsearch.runtime import seed_everything
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.bound import Applied, attach, bind
from petlsearch.searchspace.structure import Placement

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from petlsearch.plugins.base import Plugin
    from petlsearch.runners.tasks import Task

log = logging.getLogger(__name__)
# `--head-lr auto`: the head's rates tried. No one rate suits every backbone: on MiniLM's small pooled
# features the head alone wants 1e-1, on MPNet's fresh dense head 1e-2 (docs/benchmarks.md)
HEAD_RATES = (3e-3, 1e-2, 3e-2, 1e-1)
PREPARE_BATCHES = 8  # batches a data-driven plugin (FISH, SNIP, Tip-Adapter) may look at


@dataclass
class TrialOutcome:
    score: float
    params: int
    head_params: int
    metrics: dict[str, float]
    train: TrainResult
    test: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def pruned(self) -> bool:
        return self.train.pruned


def fresh_model(task: Task, plugins: dict[str, Plugin], seed: int,
                batch_size: int) -> tuple[Any, ModelGraph, dict[str, Plugin]]:
    """(model, graph, plugins): a fresh frozen backbone of `task` and fresh copies of `plugins`, as
    every trial starts. Seeded first (the new head and the modules' initialisation), so that a trial
    is the same whatever ran before it; data-driven plugins (FISH's mask, ...) prepared on the first
    training batches of that seed, so that retraining or exporting a structure finds the same masks."""
    seed_everything(seed)
    model = task.make_model()
    freeze_backbone(model)
    graph = ModelGraph.from_model(model)
    fresh = {name: p.clone() for name, p in plugins.items()}
    for plugin in fresh.values():
        if plugin.needs_data:
            plugin.prepare(model, itertools.islice(task.batches("train", batch_size, seed=seed), PREPARE_BATCHES))
    return model, graph, fresh


def fresh_backbone(task: Task, placements: Sequence[Placement], plugins: dict[str, Plugin], seed: int,
                   batch_size: int) -> tuple[Any, ModelGraph, Applied, dict[str, Plugin]]:
    """(model, graph, applied, plugins): `fresh_model` with `placements` attached."""
    used = {p.plugin for p in placements}
    model, graph, fresh = fresh_model(task, {n: p for n, p in plugins.items() if n in used}, seed, batch_size)
    fresh.update({n: p.clone() for n, p in plugins.items() if n not in used})
    applied = attach(model, bind(placements, graph, fresh))
    return model, graph, applied, fresh


def trial_groups(model: Any, graph: ModelGraph, by_plugin: dict[str, list[Any]], recipes: dict[str, Any],
                 cfg: TrainConfig, new_head: bool = True) -> list[ParamGroup]:
    """Each plugin's parameters at its recipe and the head (made trainable unless `cfg` freezes it)."""
    head = head_parameters(model, graph) if cfg.train_head and new_head else []
    for p in head:
        p.requires_grad_(True)
    return recipe_groups(by_plugin, recipes, head, cfg)


class RunnerTraining:
    """The trial interface a strategy that trains a model itself gets (`strategies.base.Training`)."""

    def fresh_model(self, task: Task, plugins: dict[str, Plugin], seed: int,
                    batch_size: int) -> tuple[Any, ModelGraph, dict[str, Plugin]]:
        return fresh_model(task, plugins, seed, batch_size)

    def groups(self, model: Any, graph: ModelGraph, by_plugin: dict[str, list[Any]], recipes: dict[str, Any],
               cfg: TrainConfig, new_head: bool = True) -> list[ParamGroup]:
        return trial_groups(model, graph, by_plugin, recipes, cfg, new_head)

    def train(self, model: Any, task: Task, groups: list[ParamGroup], cfg: TrainConfig,
              after_step: Sequence[Callable[[int], None]] = ()) -> TrainResult:
        return train(model, task, groups, cfg, after_step=after_step)


TRAINING = RunnerTraining()


def run_trial(task: Task, placements: Sequence[Placement], plugins: dict[str, Plugin], cfg: TrainConfig,
              report: Callable[..., bool] | None = None, test: bool = False,
              weights_path: str | Path | None = None, progress: Any = None) -> TrialOutcome:
    """Train `placements` on a fresh backbone; score = the task's metric on the validation split."""
    start = time.perf_counter()
    model, graph, applied, fresh = fresh_backbone(task, placements, plugins, cfg.seed, cfg.batch_size)
    groups = trial_groups(model, graph, applied.parameters_by_plugin(), {n: p.recipe for n, p in fresh.items()},
                          cfg, task.new_head)
    head = next(g.params for g in groups if g.name == "head")
    result = train(model, task, groups, cfg, report=report, progress=progress)
    test_metrics = evaluate(model, task, "test") if test else {}
    if weights_path is not None:
        applied.save_weights(weights_path)
        if task.new_head:  # a causal LM's output layer is the frozen pretrained one (often the embeddings)
            _save_head(model, graph, Path(weights_path).with_name("head.safetensors"))
    return TrialOutcome(result.val[task.metric], applied.trainable_count(), sum(p.numel() for p in head),
                        result.val, result, test_metrics, time.perf_counter() - start)


def _save_head(model: Any, graph: ModelGraph, path: Path) -> None:
    state = {f"{n.path}.{k}": v.detach().contiguous() for n in graph.find(role="head")
             for k, v in model.get_submodule(n.path).state_dict().items()}
    if state:
        save_tensors(path, state)


def trivial_baselines(task: Task, cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """The test metrics of the trivial baselines a found structure must beat, on the same split: the
    majority class of the training split, and the new head alone trained as `cfg` says (the same
    steps, seed and head rate; the frozen backbone only runs forward, so it costs a fraction of a
    run). A causal LM has no new head: its baseline is the pretrained model as it is (its
    perplexity is the figure before training)."""
    if not task.new_head:
        return {"pretrained": evaluate(task.make_model(), task, "test")}
    return {"majority_class": {task.metric: task.majority_score("test")},
            "head_only": run_trial(task, [], {}, cfg, test=True).test}


def pick_head_rate(task: Task, cfg: TrainConfig, rates: Sequence[float] = HEAD_RATES,
                   say: Callable[[str], None] | None = None) -> tuple[float, dict[float, float]]:
    """The head's rate for `task`: the head alone trained as `cfg` says (its steps, seed and
    evaluation) at each of `rates`; the best validation score wins, the validation loss breaks ties.
    Returns (rate, {rate: validation score})."""
    if not task.new_head:
        raise PetlsearchError(f"a head rate can only be picked for a task with a new head; {task.name} has none")
    scored: dict[float, tuple[float, float]] = {}
    for rate in rates:
        outcome = run_trial(task, [], {}, replace(cfg, head_lr=rate))
        scored[rate] = (outcome.score, -outcome.metrics.get("loss", 0.0))
        if say is not None:
            say(f"head rate {rate:g}: head alone {task.metric} {outcome.score:.4f} on validation")
    best = max(scored, key=scored.get)
    return best, {rate: score for rate, (score, _) in scored.items()}


def beats(test: dict[str, float], baselines: dict[str, dict[str, float]], metric: str) -> bool:
    """Whether a test result is above every trivial baseline (vacuously True without baselines)."""
    return all(test.get(metric, float("nan")) > b[metric] for b in baselines.values())
