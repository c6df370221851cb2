"""Searchable hyperparameters of a plugin: integer, float and choice dims, log or linear."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from petlsearch.errors import PluginError


@dataclass(frozen=True)
class Dim:
    """One searchable hyperparameter; `default` is what a plugin uses when nothing is searched."""

    name: str
    default: Any
    help: str = ""

    def sample(self, rng: random.Random) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def values(self, n: int = 3) -> list[Any]:
        """Up to `n` representative values, small to large (for fixed-size candidate grids)."""
        raise NotImplementedError  # pragma: no cover

    def suggest(self, trial: Any, key: str) -> Any:
        """Ask an Optuna trial for a value of this dim under the parameter name `key`."""
        raise NotImplementedError  # pragma: no cover


@dataclass(frozen=True)
class IntDim(Dim):
    low: int = 1
    high: int = 1
    log: bool = False

    def sample(self, rng: random.Random) -> int:
        if self.log:
            return int(round(math.exp(rng.uniform(math.log(self.low), math.log(self.high)))))
        return rng.randint(self.low, self.high)

    def validate(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise PluginError(f"dim '{self.name}': expected an integer, got {value!r}")
        if not self.low <= int(value) <= self.high:
            raise PluginError(f"dim '{self.name}': {value} is outside [{self.low}, {self.high}]")
        return int(value)

    def values(self, n: int = 3) -> list[int]:
        if n <= 1 or self.low == self.high:
            return [self.default]
        if self.log:
            pts = [math.exp(math.log(self.low) + i * (math.log(self.high) - math.log(self.low)) / (n - 1))
                   for i in range(n)]
        else:
            pts = [self.low + i * (self.high - self.low) / (n - 1) for i in range(n)]
        return sorted({int(round(p)) for p in pts})

    def suggest(self, trial: Any, key: str) -> int:
        return trial.suggest_int(key, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class FloatDim(Dim):
    low: float = 0.0
    high: float = 1.0
    log: bool = False

    def sample(self, rng: random.Random) -> float:
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def validate(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PluginError(f"dim '{self.name}': expected a finite number, got {value!r}")
        if not self.low <= float(value) <= self.high:
            raise PluginError(f"dim '{self.name}': {value} is outside [{self.low}, {self.high}]")
        return float(value)

    def values(self, n: int = 3) -> list[float]:
        return [self.default]

    def suggest(self, trial: Any, key: str) -> float:
        return trial.suggest_float(key, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class ChoiceDim(Dim):
    choices: tuple[Any, ...] = ()

    def sample(self, rng: random.Random) -> Any:
        return rng.choice(self.choices)

    def validate(self, value: Any) -> Any:
        if isinstance(value, list):
            value = tuple(value)
        if value not in self.choices:
            raise PluginError(f"dim '{self.name}': {value!r} is not one of {list(self.choices)}")
        return value

    def values(self, n: int = 3) -> list[Any]:
        return list(self.choices)

    def suggest(self, trial: Any, key: str) -> Any:
        return trial.suggest_categorical(key, list(self.choices))
