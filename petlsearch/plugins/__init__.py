"""Plugins: one per parameter-efficient method, found through the `petlsearch.plugins` entry points.

Importing this package is cheap; the base classes (which need torch) load on first use.
"""

from __future__ import annotations

from typing import Any

from petlsearch.plugins.registry import (
    create_plugin,
    create_plugins,
    get_plugin_class,
    list_plugins,
    load_all,
    plugins_for,
    register,
)
from petlsearch.searchspace.dims import ChoiceDim, Dim, FloatDim, IntDim

# the public names a third-party plugin needs, each from the module that defines it (loaded on first use)
_PUBLIC = {
    "Plugin": "petlsearch.plugins.base",
    **dict.fromkeys(("PETLModule", "OutputDelta", "SequentialDelta", "ParallelDelta", "Scale", "WeightDelta"),
                    "petlsearch.plugins.mechanisms.hooks"),
    "BatchShape": "petlsearch.searchspace.memory",
    "Site": "petlsearch.searchspace.sites",
    "SITE_KINDS": "petlsearch.searchspace.sites",
}

__all__ = ["ChoiceDim", "Dim", "FloatDim", "IntDim", "create_plugin", "create_plugins", "get_plugin_class",
           "list_plugins", "load_all", "plugins_for", "register", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'petlsearch.plugins' has no attribute {name!r}")
