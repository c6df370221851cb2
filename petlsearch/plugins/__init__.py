"""Plugins: one per parameter-efficient method, found through the `petlsearch.plugins` entry points.

Importing this package is cheap; the base classes (which need torch) load on first use.
"""

from __future__ import annotations

from typing import Any

from petlsearch.plugins.registry import (create_plugin, create_plugins, get_plugin_class, list_plugins, load_all,
                                         plugins_for, register)
from petlsearch.searchspace.dims import ChoiceDim, Dim, FloatDim, IntDim

_BASE = {"Plugin", "Site", "PETLModule", "OutputDelta", "SequentialDelta", "ParallelDelta", "Scale",
         "WeightDelta", "BatchShape", "SITE_KINDS"}

__all__ = ["ChoiceDim", "Dim", "FloatDim", "IntDim", "create_plugin", "create_plugins", "get_plugin_class",
           "list_plugins", "load_all", "plugins_for", "register", *sorted(_BASE)]


def __getattr__(name: str) -> Any:
    if name in _BASE:
        from petlsearch.plugins import base
        from petlsearch.searchspace import sites

        return getattr(sites, name) if name == "SITE_KINDS" else getattr(base, name)
    raise AttributeError(f"module 'petlsearch.plugins' has no attribute {name!r}")
