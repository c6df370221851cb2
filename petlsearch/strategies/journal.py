"""An append-only JSON-lines journal that survives a crash: each record is flushed and fsynced, and
a torn last line (the process died mid-write) is ignored when the journal is read back."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Journal:
    """`default` turns what JSON cannot hold (numpy scalars, paths) into what it can."""

    def __init__(self, path: str | Path, default: Callable[[Any], Any] = str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.default = default

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, default=self.default)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self, by: str = "number") -> list[dict[str, Any]]:
        """Records in order; of those with the same `by` field (a trial's number) only the last counts."""
        if not self.path.exists():
            return []
        latest: dict[Any, dict[str, Any]] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            latest[rec.get(by)] = rec
        return list(latest.values())
