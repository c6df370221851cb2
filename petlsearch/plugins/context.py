"""Per-forward context that modules may read: the current task (multi-task methods such as ATTEMPT,
HyperPrompt and VL-Adapter sharing) and extra inputs a module needs beside the model's own (MAGMA's
image features). The trainer sets it around each batch; a plain forward outside any context sees
task None and no extras.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

_task: contextvars.ContextVar[str | None] = contextvars.ContextVar("petlsearch_task", default=None)
_extras: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("petlsearch_extras", default={})


def current_task() -> str | None:
    """The task of the batch being processed, or None for single-task use."""
    return _task.get()


def extras() -> dict[str, Any]:
    """Extra per-batch inputs (e.g. {'image_features': tensor}) set by the caller."""
    return _extras.get()


@contextlib.contextmanager
def use(task: str | None = None, **extra: Any) -> Iterator[None]:
    """Run a forward with `task` as the current task and `extra` as per-batch extras."""
    t1 = _task.set(task)
    t2 = _extras.set({**_extras.get(), **extra})
    try:
        yield
    finally:
        _task.reset(t1)
        _extras.reset(t2)
