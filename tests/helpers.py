"""The tests' fixtures: the public ones of `petlsearch.testing`, under the names the tests use, and
the folder of a named real model (skipped with the pip line when its packages are missing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from petlsearch.testing import frozen_tiny, tiny_text_task, trainable_numel

__all__ = ["frozen_tiny", "named_model_or_skip", "tiny_text_task", "trainable_numel"]


def named_model_or_skip(key: str) -> Path:
    """The cache folder of `--model key` (mpnet, smollm2), built on first use; a missing package
    skips the test with the install line."""
    from petlsearch.errors import MissingDependencyError
    from petlsearch.runners.named_models import model_folder

    try:
        return Path(model_folder(key))
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
