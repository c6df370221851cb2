"""Task: a data source, a model factory, how to batch and the metric; what a trial trains on.

`petlsearch.runners.tasks.get_task` builds one by name; `runners.multitask.MultiTask` is a
mixture of them. Kept apart from both so that each imports it one way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from petlsearch.runners import data as D

if TYPE_CHECKING:
    import torch
    from torch import nn

INIT_SEED = 0  # the seed of every task's new head (see Task.make_model)


def torch_no_grad(fn: Callable) -> Callable:
    """torch.no_grad() as a decorator, imported when the function runs (no torch at import time)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


@dataclass
class Task:
    """Splits + a model factory + how to batch + the metric (higher is better)."""

    name: str
    kind: str  # "text" | "image" | "lm"
    splits: D.Splits
    model_name: str
    model_factory: Callable[[], nn.Module]
    encode: Callable[[Any], dict[str, Any]]  # a list of inputs -> model kwargs (without labels)
    metric: str = "accuracy"
    max_length: int = 64
    tokenizer: Any = None  # a text task's, saved beside an exported model
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def new_head(self) -> bool:
        """Classification tasks add a fresh head that trains with the modules; an LM's head is the
        pretrained (often embedding-tied) output layer and stays frozen."""
        return self.kind != "lm"

    @property
    def num_labels(self) -> int:
        return len(self.splits.classes)

    def make_model(self) -> nn.Module:
        """A fresh copy of the pretrained model with a new head (loaded from disk once). The new
        head is drawn from a fixed seed, without touching the caller's random state: torch seeds
        each process at random, so a head drawn from the global state made every run depend on
        what its process had done before."""
        if "model" not in self._cache:
            import torch

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(INIT_SEED)
                self._cache["model"] = self.model_factory()
        model = copy.deepcopy(self._cache["model"])
        model.train()
        return model

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                fraction: float = 1.0, epochs: int | None = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of model kwargs with 'labels'; `fraction` keeps a seeded stratified-enough subset."""
        import torch

        x, y = self.splits.split(split)
        n = len(y)
        rng = np.random.default_rng(seed)
        keep = np.arange(n)
        if fraction < 1.0:
            keep = np.sort(rng.permutation(n)[: max(batch_size, int(round(fraction * n)))])
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(keep) if shuffle else keep
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                items = [x[i] for i in idx] if isinstance(x, list) else x[idx]
                batch = self.encode(items)
                batch.setdefault("labels", torch.as_tensor(y[idx]))  # LM tasks make their own
                yield batch
            epoch += 1

    @torch_no_grad
    def evaluate(self, model: nn.Module, split: str = "val", batch_size: int = 64, max_examples: int | None = None,
                 device: Any = None) -> dict[str, float]:
        """Metrics on a split: the task's metric (accuracy, macro F1; next-token accuracy and
        perplexity for LM tasks) and the loss."""
        import math

        import torch

        device = device or next(model.parameters()).device
        was_training = model.training
        model.eval()
        scores, logits, labels, loss_sum, seen = [], [], [], 0.0, 0
        for batch in self.batches(split, batch_size):
            out = model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
            n = len(batch["labels"])
            if self.kind == "lm":  # (B, T, V) logits: score per batch, weight by tokens
                scores.append(self.score(out.logits.float().cpu(), batch["labels"]))
            else:
                logits.append(out.logits.float().cpu())
                labels.append(batch["labels"])
            loss_sum += float(out.loss) * n
            seen += n
            if max_examples is not None and seen >= max_examples:
                break
        model.train(was_training)
        if self.kind == "lm":
            tokens = sum(s["tokens"] for s in scores)
            metrics = {self.metric: sum(s[self.metric] * s["tokens"] for s in scores) / max(tokens, 1)}
        else:
            metrics = self.score(torch.cat(logits), torch.cat(labels))
        metrics["loss"] = loss_sum / max(seen, 1)
        if self.kind == "lm":
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        return metrics

    def majority_score(self, split: str = "test", max_examples: int | None = None) -> float | None:
        """The task's metric on `split` (its first `max_examples`, as `evaluate` reads them) of always
        predicting the training split's most common class (the chance line a result is judged
        against); None for an LM task."""
        if self.kind == "lm":
            return None
        import torch

        majority = int(np.bincount(np.asarray(self.splits.y_train), minlength=self.num_labels).argmax())
        labels = self.splits.split(split)[1][:max_examples]
        logits = torch.nn.functional.one_hot(torch.full((len(labels),), majority), self.num_labels).float()
        return self.score(logits, torch.as_tensor(labels))[self.metric]

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Classification: accuracy and macro F1. LM (logits (B, T, V)): next-token accuracy."""
        from sklearn.metrics import f1_score

        if self.kind == "lm":
            target = labels[:, 1:]
            keep = target != -100
            hits = (logits[:, :-1].argmax(-1) == target) & keep
            return {"token_accuracy": float(hits.sum() / keep.sum().clamp(min=1)), "tokens": int(keep.sum())}
        pred = logits.argmax(-1).cpu().numpy()
        true = labels.cpu().numpy()
        return {"accuracy": float((pred == true).mean()),
                "f1": float(f1_score(true, pred, average="macro"))}
