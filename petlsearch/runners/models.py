"""Adapters that give every backbone the `model(**inputs, labels=...) -> output.loss / .logits` interface."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ImageClassifier(nn.Module):
    """Wraps a CNN that maps pixels to logits (EfficientNet) so the trainer can call it like HF models."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.petlsearch_family = type(net).__name__.lower()  # the graph's family is the CNN's

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.net(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
