"""Fast fixtures shared by the tests: a real-data text task on a tiny random BERT."""

from __future__ import annotations

import numpy as np

from petlsearch.runners import data as D
from petlsearch.runners.tasks import Task, _text_encoder

_SPLITS: dict[int, D.Splits] = {}


def tiny_text_task(limit: int = 256, seed: int = 0, layers: int = 2, hidden: int = 32) -> Task:
    """Rotten Tomatoes (the real default data, `limit` training examples) on a tiny random BERT that
    uses MiniLM's real tokenizer: trains in a fraction of a second per step."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if seed not in _SPLITS:
        _SPLITS[seed] = D.rotten_tomatoes(seed)
    full = _SPLITS[seed]
    rng = np.random.default_rng(seed)

    def cut(x: list, y: np.ndarray, n: int) -> tuple[list, np.ndarray]:
        idx = np.sort(rng.permutation(len(y))[:n])
        return [x[i] for i in idx], y[idx]

    splits = D.Splits(*cut(full.x_train, full.y_train, limit), *cut(full.x_val, full.y_val, limit // 4),
                      *cut(full.x_test, full.y_test, limit // 4), full.classes)
    tokenizer = AutoTokenizer.from_pretrained(D.minilm_path())

    def factory() -> BertForSequenceClassification:
        import torch

        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128,
                         num_labels=2)
        return BertForSequenceClassification(cfg)

    return Task("rotten_tomatoes_tiny", "text", splits, "tiny-bert", factory, _text_encoder(tokenizer, 32),
                max_length=32)


def frozen_tiny(family: str = "bert"):
    """A tiny model of `family` with every parameter frozen, and its graph."""
    from petlsearch.plugins import _tiny as tiny
    from petlsearch.searchspace.graph import ModelGraph

    model = tiny.FAMILIES[family]()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ModelGraph.from_model(model)


def trainable_numel(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
