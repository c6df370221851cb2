"""The tests' fixtures: the public ones of `petlsearch.testing`, under the names the tests use."""

from __future__ import annotations

from petlsearch.testing import frozen_tiny, tiny_text_task, trainable_numel

__all__ = ["frozen_tiny", "tiny_text_task", "trainable_numel"]
