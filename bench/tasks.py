"""Tasks and batches the benchmarks share, each built once per process.

- `minilm_task()`: the default task (the packaged all-MiniLM-L6-v2 on Rotten Tomatoes).
- `tiny_task()`: the same real data (a few hundred snippets) on a tiny random BERT that uses
  MiniLM's tokenizer: the quick modes train on it in a fraction of a second per step.
- `fixed_batch(task, batch, seq)`: real snippets padded to exactly `seq` tokens, with labels.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from petlsearch.runners.data import Splits
    from petlsearch.runners.tasks import Task


@functools.lru_cache(maxsize=2)
def rotten_tomatoes(seed: int = 0) -> Splits:
    from petlsearch.runners import data as D

    return D.rotten_tomatoes(seed)


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from petlsearch.runners import data as D

    return AutoTokenizer.from_pretrained(D.minilm_path())


@functools.lru_cache(maxsize=4)
def minilm_task(limit: int | None = None, max_length: int = 64) -> Task:
    """MiniLM on Rotten Tomatoes; `limit` keeps that many training examples (evaluation splits whole)."""
    from petlsearch.runners.tasks import Task, text_encoder, text_model

    splits = rotten_tomatoes(0)
    if limit is not None:
        splits = splits.subset(limit, len(splits.y_val), 0)
    display, factory, tok = text_model("minilm", len(splits.classes))
    return Task("rotten_tomatoes", "text", splits, display, factory, text_encoder(tok, max_length),
                max_length=max_length)


@functools.lru_cache(maxsize=4)
def tiny_task(n_train: int = 256, layers: int = 2, hidden: int = 32) -> Task:
    """Real Rotten Tomatoes snippets on a tiny random BERT (MiniLM's tokenizer, sequences of 32)."""
    from petlsearch.testing import tiny_text_task

    return tiny_text_task(n_train, 0, layers, hidden, n_eval=max(64, n_train // 4))


def fixed_batch(task: Task, batch: int, seq: int, split: str = "train") -> dict[str, Any]:
    """The first `batch` snippets of a split, tokenised and padded to exactly `seq` tokens."""
    import torch

    x, y = task.splits.split(split)
    enc = tokenizer()(list(x[:batch]), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    out = dict(enc)
    out["labels"] = torch.as_tensor(y[:batch])
    return out
