"""Fixtures for testing petlsearch and plugins built on it: fast, real-data, no download.

- `tiny_text_task`: real Rotten Tomatoes snippets on a tiny random BERT that uses MiniLM's real
  tokenizer; a training step takes a fraction of a second.
- `frozen_tiny(family)`: a tiny model of a family (BERT, GPT-2, T5, Llama, ViT, CLIP; the
  conformance kit's, `petlsearch.plugins.testing`) with every parameter frozen, and its graph;
  `tiny_batch(model, family)` a seeded batch for it, with the labels its loss reads.
- `Splits.subset` (`petlsearch.runners.data`) cuts any task's splits to a size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from petlsearch.runners.tasks import Task
    from petlsearch.searchspace.graph import ModelGraph

_SPLITS: dict[int, Any] = {}


def tiny_text_task(limit: int = 256, seed: int = 0, layers: int = 2, hidden: int = 32,
                   n_eval: int | None = None) -> Task:
    """Rotten Tomatoes (`limit` training and `n_eval`, default limit / 4, validation and test
    examples, drawn with `seed`) on a tiny random BERT of `layers` x `hidden` (weights from `seed`)
    with MiniLM's tokenizer, sequences of 32 tokens."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from petlsearch.runners import data as D
    from petlsearch.runners.tasks import Task, text_encoder

    if seed not in _SPLITS:
        _SPLITS[seed] = D.rotten_tomatoes(seed)
    splits = _SPLITS[seed].subset(limit, limit // 4 if n_eval is None else n_eval, seed)
    tokenizer = AutoTokenizer.from_pretrained(D.minilm_path())

    def factory() -> BertForSequenceClassification:
        import torch

        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128,
                         num_labels=2)
        return BertForSequenceClassification(cfg)

    return Task("rotten_tomatoes_tiny", "text", splits, "tiny-bert", factory, text_encoder(tokenizer, 32),
                max_length=32, tokenizer=tokenizer)


def frozen_tiny(family: str = "bert") -> tuple[nn.Module, ModelGraph]:
    """A tiny model of `family` with every parameter frozen, and its graph."""
    from petlsearch.plugins import _tiny as tiny
    from petlsearch.searchspace.graph import ModelGraph

    model = tiny.FAMILIES[family]()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ModelGraph.from_model(model)


def tiny_batch(model: nn.Module, family: str) -> dict[str, Any]:
    """A seeded batch (2 examples) for `frozen_tiny(family)`'s model, with labels: class ids for a
    classifier, the tokens themselves for a language model (CLIP's contrastive loss needs none)."""
    from petlsearch.plugins import _tiny as tiny
    from petlsearch.plugins.checks import labelled

    return labelled(model, family, tiny.inputs(family))


def trainable_numel(model: nn.Module) -> int:
    """Parameters of `model` that train."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
