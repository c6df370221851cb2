"""Budget: how many trainable parameters (and/or bytes of training memory) a structure may use.

Parameter budgets: "0.01%" or "1e-4" (a fraction of the backbone's parameters, task head
excluded), "25k" / "1.2M" / "300" (absolute). Memory budgets: "2GiB", "500MB", "512MiB".
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from petlsearch.errors import BudgetError

FORMS = "'0.01%' or '1e-4' (fraction of the backbone), '25k' / '1.2M' / '300' (parameters), '2GiB' / '500MB' (memory)"
# The memory model is within a few percent of measurement on the tested configs (tests/searchspace/
# test_memory.py); a memory budget is hard, so estimates are checked with this much headroom.
MEMORY_HEADROOM = 0.05
_PARAM_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}
_MEM_SUFFIX = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_NUMBER = r"(\d+(?:\.\d*)?(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?)"


def parse_params(spec: str) -> tuple[float | None, int | None]:
    """(fraction, absolute) from a parameter budget string; exactly one is set."""
    text = str(spec).strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(_NUMBER + r"\s*%", text)
    if m:
        frac = float(m.group(1)) / 100
        return _check_fraction(frac, spec), None
    m = re.fullmatch(_NUMBER + r"\s*([kmbg]?)", text)
    if not m:
        raise BudgetError(f"cannot read the budget {spec!r}; use {FORMS}")
    value = float(m.group(1))
    if not m.group(2) and value < 1:
        return _check_fraction(value, spec), None
    total = value * _PARAM_SUFFIX[m.group(2)]
    if not math.isfinite(total) or total < 1 or total > 1e13:
        raise BudgetError(f"budget {spec!r} is not a sensible parameter count; use {FORMS}")
    return None, int(total)


def _check_fraction(frac: float, spec: str) -> float:
    if not 0 < frac <= 1:
        raise BudgetError(f"budget {spec!r} must be a fraction in (0, 100%]; use {FORMS}")
    return frac


def parse_memory(spec: str) -> int:
    """Bytes from a memory budget string such as '2GiB' or '500MB'."""
    text = str(spec).strip().lower().replace("_", "")
    m = re.fullmatch(_NUMBER + r"\s*([kmgt]i?b|b)", text)
    if not m:
        raise BudgetError(f"cannot read the memory budget {spec!r}; use e.g. '2GiB', '500MB' or '512MiB'")
    value = float(m.group(1)) * _MEM_SUFFIX[m.group(2)]
    if not math.isfinite(value) or value < 1 or value > 2**50:
        raise BudgetError(f"memory budget {spec!r} is out of range")
    return int(value)


def _looks_like_memory(spec: str) -> bool:
    return bool(re.search(r"\d\s*[kmgt]i?b\s*$|\d\s*b\s*$", str(spec).strip().lower()))


@dataclass(frozen=True)
class Budget:
    """A parameter budget (fraction or absolute), a memory budget in bytes, or both."""

    fraction: float | None = None
    params: int | None = None
    memory: int | None = None
    include_head: bool = False
    spec: str = ""
    memory_spec: str = ""  # the memory budget as the user wrote it ('1MB'), echoed back in that unit
    # set once by `bind`: the backbone a fraction is of, and the head's parameters (which an
    # include_head budget pays for before any module)
    backbone_params: int | None = None
    head_params: int = 0

    @classmethod
    def parse(cls, spec: str | None = None, memory: str | None = None, include_head: bool = False) -> Budget:
        """Read `--budget` and `--memory-budget`; a memory string given as `spec` counts as memory."""
        fraction = params = mem = None
        mem_spec = ""
        if spec is not None and str(spec).strip():
            if _looks_like_memory(spec):
                mem, mem_spec = parse_memory(spec), str(spec).strip()
            else:
                fraction, params = parse_params(spec)
        if memory is not None and str(memory).strip():
            mem, mem_spec = parse_memory(memory), str(memory).strip()
        if fraction is None and params is None and mem is None:
            raise BudgetError(f"no budget given; use {FORMS}")
        label = " + ".join(str(s) for s in (spec, memory) if s)
        return cls(fraction, params, mem, include_head, label, mem_spec)

    def bind(self, backbone_params: int, head_params: int = 0) -> Budget:
        """This budget for one backbone (what a fraction is of) and its task head."""
        return replace(self, backbone_params=int(backbone_params), head_params=int(head_params))

    @property
    def total(self) -> int | None:
        """The parameter budget itself, head included if it counts (None: no parameter limit)."""
        if self.params is not None:
            return self.params
        if self.fraction is not None:
            if self.backbone_params is None:
                raise BudgetError(f"budget {self.spec or self.fraction!r} is a fraction of a backbone: bind it first")
            return int(math.floor(self.fraction * self.backbone_params))
        return None

    @property
    def limit(self) -> int | None:
        """The most trainable parameters the modules may use: the budget, less the head when it counts."""
        total = self.total
        return None if total is None else total - (self.head_params if self.include_head else 0)

    def fits(self, params: int, memory: int | None = None) -> bool:
        """True when the modules' `params` and the estimated `memory` (with MEMORY_HEADROOM for the
        model's error) are within budget."""
        limit = self.limit
        if limit is not None and params > limit:
            return False
        return not (self.memory is not None and memory is not None and memory * (1 + MEMORY_HEADROOM) > self.memory)

    def describe(self) -> str:
        parts = []
        if self.fraction is not None:
            p = f"{self.fraction * 100:g}% of the backbone"
            if self.backbone_params:
                p += f" = {self.total:,} parameters"
            parts.append(p)
        if self.params is not None:
            parts.append(f"{self.params:,} parameters")
        if self.memory is not None:
            parts.append(f"{self.memory_spec or _in_bytes(self.memory)} of training memory")
        head = f" (the head's {self.head_params:,} included)" if self.head_params else " (head included)"
        return " and ".join(parts) + (head if self.include_head else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        return cls(**{k: data.get(k) for k in ("fraction", "params", "memory", "backbone_params")},
                   include_head=bool(data.get("include_head", False)), spec=str(data.get("spec", "")),
                   memory_spec=str(data.get("memory_spec", "")), head_params=int(data.get("head_params") or 0))


def _in_bytes(n: int) -> str:
    """A byte count in the largest binary unit that keeps it at least 1 ('1.5GiB', '300MiB')."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n}B"
