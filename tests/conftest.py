from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_task():
    from tests.helpers import tiny_text_task

    return tiny_text_task()
