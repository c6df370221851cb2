"""Smoke mode: `PETLSEARCH_SMOKE=1` runs any command or API call at a token compute, to check that it
works end to end in seconds (the README test runs every documented command this way).

Every training stops after `Smoke.steps` optimizer steps, a search proposes at most `Smoke.trials`
trials, and a task built by name keeps `Smoke.examples` training examples (its validation and test
splits shrink with it). The figures of such a run mean nothing: the run says so when it starts, and
its result records `smoke: true`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "PETLSEARCH_SMOKE"
NOTICE = f"smoke mode ({ENV} is set): token compute, the figures of this run mean nothing"


@dataclass(frozen=True)
class Smoke:
    steps: int = 2
    trials: int = 2
    examples: int = 64


def smoke() -> Smoke | None:
    """The caps when smoke mode is on (the variable set to anything but '', 0, false or no), else None."""
    value = os.environ.get(ENV, "").strip().lower()
    return None if value in ("", "0", "false", "no") else Smoke()
