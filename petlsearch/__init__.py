"""petlsearch: find the best parameter-efficient fine-tuning structure for a frozen pretrained model
under a budget of trainable parameters or training memory.

Importing the package is cheap (no torch); `petlsearch.search` loads the heavy parts on first use.
"""

from __future__ import annotations

from typing import Any

from petlsearch.errors import (
    BudgetError,
    MissingDependencyError,
    PetlsearchError,
    PluginError,
    StructureError,
    TaskError,
)

__version__ = "0.1.0"
__all__ = ["BudgetError", "MissingDependencyError", "PetlsearchError", "PluginError", "StructureError",
           "TaskError", "__version__", "search", "Budget", "ModelGraph", "SearchSpace", "Structure"]

_LAZY = {
    "search": "petlsearch.runners.search",
    "Budget": "petlsearch.searchspace.budget",
    "ModelGraph": "petlsearch.searchspace.graph",
    "SearchSpace": "petlsearch.searchspace.space",
    "Structure": "petlsearch.searchspace.structure",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'petlsearch' has no attribute {name!r}")
