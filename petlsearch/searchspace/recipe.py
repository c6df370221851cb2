"""How a plugin's modules train: the learning rate, and where its paper says so the head's rate and
weight decay, each with where the value comes from.

A plugin declares one as its `recipe` class attribute; a plugin that declares none trains at
`DEFAULT_RECIPE`. A structure that mixes methods trains each plugin's parameters in their own
optimizer group at their own rate (`runners.trainer.recipe_groups`), and a run's `--lr` scales every
recipe at once (or replaces them with one absolute rate). Pure Python: registering a plugin checks
its recipe without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from petlsearch.errors import PluginError

HEAD_LR = 1e-2  # a new task head of a few hundred weights on frozen features: the zoo's rate


@dataclass(frozen=True)
class Recipe:
    """`lr`: the modules' learning rate; `head_lr`: the new task head's, when the method needs its own
    (None: HEAD_LR, or the run's --head-lr); `weight_decay`: AdamW's, on the modules; `source`:
    the paper or the measurement that chose the values."""

    lr: float
    source: str
    head_lr: float | None = None
    weight_decay: float = 0.0

    def check(self, owner: str) -> None:
        """Raise PluginError naming `owner` when a value cannot train (not a positive finite rate)."""
        _number(owner, "lr", self.lr, positive=True)
        if self.head_lr is not None:
            _number(owner, "head_lr", self.head_lr, positive=True)
        _number(owner, "weight_decay", self.weight_decay, positive=False)
        if not isinstance(self.source, str) or not self.source.strip():
            raise PluginError(f"plugin '{owner}': recipe source must say where the values come from "
                              "(a paper, or the measurement that chose them)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_recipe(recipe: Any, owner: str) -> None:
    """Raise PluginError naming `owner` unless `recipe` is a Recipe whose values can train: what
    registration and the conformance kit both check."""
    if not isinstance(recipe, Recipe):
        raise PluginError(f"plugin '{owner}': recipe must be a petlsearch.searchspace.recipe.Recipe, got {recipe!r}")
    recipe.check(owner)


def _number(owner: str, name: str, value: Any, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        need = "a positive finite number" if positive else "a finite number >= 0"
        raise PluginError(f"plugin '{owner}': recipe {name}={value!r} must be {need}")


DEFAULT_RECIPE = Recipe(
    lr=1e-3, source="petlsearch's default for a plugin that declares no recipe: the rate at which modules "
    "at every site of MiniLM learn in 100 steps (python -m bench --only recipes)")
