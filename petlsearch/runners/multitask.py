"""Multi-task mixtures: several classification tasks on one frozen backbone, one head per task.

Each training batch comes from one task, drawn in proportion to the tasks' sizes (mixed-task
batches over a step sequence, as T5-style mixtures); the batch carries its task name, and the model
runs it inside `petlsearch.plugins.context.use(task=...)`, so that per-task placements
(Placement.tasks) and task-aware plugins (ATTEMPT, HyperPrompt, VL-Adapter) see the right task.

    mix = multitask({"rt": get_task("rotten_tomatoes"), "mine": get_task("csv:mine.csv")})
    petlsearch.search(task=mix, plugins=["attempt", "vl_adapter"], ...)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np
import torch
from torch import nn

from petlsearch.errors import TaskError
from petlsearch.plugins.context import current_task, use
from petlsearch.runners.task import Task


class TaskHeads(nn.Module):
    """One Linear head per task (B, in) -> (B, classes of the current task)."""

    def __init__(self, in_features: int, classes: dict[str, int]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(in_features, n) for name, n in classes.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = current_task()
        if task not in self.heads:
            raise TaskError(f"no head for task {task!r}; tasks: {list(self.heads)}")
        return self.heads[task](x)


class MultiTaskModel(nn.Module):
    """A classifier whose head is replaced by TaskHeads; `forward(task=..., labels=..., **inputs)`."""

    def __init__(self, model: nn.Module, head_path: str, classes: dict[str, int]) -> None:
        super().__init__()
        self.model = model
        parent, _, leaf = head_path.rpartition(".")
        old = model.get_submodule(head_path)
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, TaskHeads(old.in_features, classes))

    def forward(self, task: str, labels: torch.Tensor | None = None, **inputs: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        with use(task=task):
            logits = self.model(**inputs).logits
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclass
class MultiTask(Task):
    """A Task over several classification tasks of one modality and backbone."""

    tasks: dict[str, Task] = field(default_factory=dict)

    def make_model(self) -> nn.Module:
        from petlsearch.searchspace.graph import ModelGraph

        first = next(iter(self.tasks.values()))
        model = first.make_model()
        heads = ModelGraph.from_model(model).find(role="head")
        if len(heads) != 1:
            raise TaskError(f"multi-task needs one classification head to replace, found {len(heads)}")
        return MultiTaskModel(model, heads[0].path, {n: t.num_labels for n, t in self.tasks.items()})

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                fraction: float = 1.0, epochs: int | None = 1) -> Iterator[dict[str, Any]]:
        """Training (epochs=None): an endless stream, each batch from a task drawn in proportion
        to its size. Evaluation: every task's split in turn."""
        streams = {n: t.batches(split, batch_size, shuffle, seed, fraction, epochs) for n, t in self.tasks.items()}
        if epochs is not None:
            for name, stream in streams.items():
                for batch in stream:
                    yield {**batch, "task": name}
            return
        names = list(self.tasks)
        sizes = np.array([len(self.tasks[n].splits.y_train) for n in names], dtype=float)
        rng = np.random.default_rng(seed)
        while True:
            name = names[rng.choice(len(names), p=sizes / sizes.sum())]
            yield {**next(streams[name]), "task": name}

    def majority_score(self, split: str = "test", max_examples: int | None = None) -> float | None:
        """The mean over tasks of each task's majority-class score, as `evaluate` means its metric."""
        return float(np.mean([t.majority_score(split, max_examples) for t in self.tasks.values()]))

    def evaluate(self, model: nn.Module, split: str = "val", batch_size: int = 64, max_examples: int | None = None,
                 device: Any = None) -> dict[str, float]:
        """Per-task metrics (`<task>/accuracy`) and their mean as the mixture's score."""
        per_task: dict[str, float] = {}
        for name, task in self.tasks.items():
            wrapped = _Bound(model, name)
            metrics = Task.evaluate(task, wrapped, split, batch_size, max_examples, device)
            per_task.update({f"{name}/{k}": v for k, v in metrics.items()})
        out = {k: float(np.mean([per_task[f"{n}/{k}"] for n in self.tasks])) for k in ("accuracy", "f1", "loss")}
        return {**out, **per_task}


class _Bound(nn.Module):
    """The multi-task model with its task fixed, so a single task's evaluate can drive it."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.inner = model
        self.task = task

    def forward(self, **batch: Any) -> Any:
        return self.inner(task=self.task, **batch)


def task_keys(specs: Iterable[str]) -> dict[str, str]:
    """A readable key per task spec of a mixture, usable as a module name (no '.'): a file task is
    named by its file's stem (`csv:data/reviews.csv` -> `reviews`), repeats get a suffix."""
    keys: dict[str, str] = {}
    for spec in specs:
        kind, _, arg = spec.partition(":")
        base = re.sub(r"[^0-9A-Za-z_-]+", "_", PurePath(arg).stem if arg else kind).strip("_") or "task"
        key, n = base, 2
        while key in keys.values():
            key, n = f"{base}_{n}", n + 1
        keys[spec] = key
    return keys


def multitask(tasks: dict[str, Task], name: str | None = None) -> MultiTask:
    """A mixture of classification tasks that share one backbone (and its tokenizer or image size).
    `tasks` maps each task's key (its name in metrics, heads and `context.use(task=...)`) to it."""
    if len(tasks) < 2:
        raise TaskError("a multi-task mixture needs at least two tasks")
    bad = [k for k in tasks if not k or "." in k]
    if bad:
        raise TaskError(f"task keys of a mixture name modules and cannot be empty or contain '.': {bad}")
    kinds = {t.kind for t in tasks.values()}
    models = {t.model_name for t in tasks.values()}
    if kinds - {"text", "image"} or len(kinds) != 1 or len(models) != 1:
        raise TaskError(f"tasks of a mixture must be classification tasks of one kind on one backbone; got "
                        f"kinds {sorted(kinds)} and models {sorted(models)}")
    first = next(iter(tasks.values()))
    return MultiTask(name or "+".join(tasks), first.kind, first.splits, first.model_name, first.model_factory,
                     first.encode, max_length=first.max_length, tasks=dict(tasks))
