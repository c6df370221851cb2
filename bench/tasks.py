"""Tasks and batches the benchmarks share, each built once per process.

- `minilm_task()`: the default task (the packaged all-MiniLM-L6-v2 on Rotten Tomatoes).
- `tiny_task()`: the same real data (a few hundred snippets) on a tiny random BERT that uses
  MiniLM's tokenizer: the quick modes train on it in a fraction of a second per step.
- `fixed_batch(task, batch, seq)`: real snippets padded to exactly `seq` tokens, with labels.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

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


def _subset(splits: Splits, n_train: int, n_eval: int, seed: int) -> Splits:
    from petlsearch.runners import data as D

    rng = np.random.default_rng(seed)

    def cut(x: list, y: np.ndarray, n: int) -> tuple[list, np.ndarray]:
        idx = np.sort(rng.permutation(len(y))[:n])
        return [x[i] for i in idx], y[idx]

    return D.Splits(*cut(splits.x_train, splits.y_train, n_train), *cut(splits.x_val, splits.y_val, n_eval),
                    *cut(splits.x_test, splits.y_test, n_eval), splits.classes)


@functools.lru_cache(maxsize=4)
def minilm_task(limit: int | None = None, max_length: int = 64) -> Task:
    """MiniLM on Rotten Tomatoes; `limit` keeps that many training examples (evaluation splits whole)."""
    from petlsearch.runners.tasks import Task, _text_encoder, _text_model

    splits = rotten_tomatoes(0)
    if limit is not None:
        splits = _subset(splits, limit, len(splits.y_val), 0)
    display, factory, tok = _text_model("minilm", len(splits.classes))
    return Task("rotten_tomatoes", "text", splits, display, factory, _text_encoder(tok, max_length),
                max_length=max_length)


@functools.lru_cache(maxsize=4)
def tiny_task(n_train: int = 256, layers: int = 2, hidden: int = 32) -> Task:
    """Real Rotten Tomatoes snippets on a tiny random BERT (MiniLM's tokenizer, sequences of 32)."""
    from transformers import BertConfig, BertForSequenceClassification

    from petlsearch.runners.tasks import Task, _text_encoder

    splits = _subset(rotten_tomatoes(0), n_train, max(64, n_train // 4), 0)
    tok = tokenizer()

    def factory() -> BertForSequenceClassification:
        import torch

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128,
                         num_labels=2)
        return BertForSequenceClassification(cfg)

    return Task("rotten_tomatoes_tiny", "text", splits, "tiny-bert", factory, _text_encoder(tok, 32), max_length=32)


def fixed_batch(task: Task, batch: int, seq: int, split: str = "train") -> dict[str, Any]:
    """The first `batch` snippets of a split, tokenised and padded to exactly `seq` tokens."""
    import torch

    x, y = task.splits.split(split)
    enc = tokenizer()(list(x[:batch]), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    out = dict(enc)
    out["labels"] = torch.as_tensor(y[:batch])
    return out
