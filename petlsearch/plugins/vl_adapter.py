"""VL-Adapter: bottleneck adapters shared across tasks and, optionally, across layers.

Sung, Cho and Bansal, "VL-Adapter: Parameter-Efficient Transfer Learning for Vision-and-Language
Tasks", CVPR 2022. A frozen VL-T5 / VL-BART is trained on several tasks at once (VQA, GQA, NLVR2,
captioning) with Houlsby-style bottleneck adapters after the attention and FFN sublayers. Their
best trade-off is a single adapter set shared by all tasks ("Single Adapter"), against per-task
adapters ("Multiple Adapters"). Sharing one adapter between the layers of a stack is offered here
as a further option of the same idea (`share_layers`).

Dims: `bottleneck`; `share` = "tasks" (one adapter for every task) or "none" (one adapter per task of
the constructor's `tasks`, picked at each forward by `context.current_task()`); `share_layers`
(every placement of the same sublayer kind in the same stack and of the same config uses one
adapter set). Shared sets are counted once per structure through `shared_key` / `shared_count`, so
k placements with share_layers=True add exactly one adapter set.

Shared sets belong to one model: a plugin instance that attaches to several models (trials, copies)
gives each model its own sets, so training one model never leaks into the next.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.context import current_task
from petlsearch.plugins.mechanisms.hooks import PETLModule, SequentialDelta
from petlsearch.plugins.parts.bottleneck import ACTIVATIONS, Bottleneck, bottleneck_count
from petlsearch.searchspace.dims import ChoiceDim, Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, sublayer_sites

ALL_TASKS = "all"  # the ModuleDict key of the one adapter that share="tasks" keeps


class TaskAdapters(nn.Module):
    """One bottleneck per task (share="none") or a single one for all tasks (share="tasks")."""

    def __init__(self, features: int, bottleneck: int, activation: str, tasks: tuple[str, ...]) -> None:
        super().__init__()
        names = tasks or (ALL_TASKS,)
        self.per_task = bool(tasks)
        self.adapters = nn.ModuleDict({t: Bottleneck(features, bottleneck, features, activation) for t in names})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.per_task:
            return self.adapters[ALL_TASKS](h)
        task = current_task()
        if task not in self.adapters:
            raise PluginError(f"vl_adapter with share='none' has adapters for tasks {list(self.adapters)}, "
                              f"but the current task is {task!r}; run the forward inside "
                              "petlsearch.plugins.context.use(task=...)")
        return self.adapters[task](h)


class VLAdapterModule(SequentialDelta):
    """h -> h + gate * adapter_task(h) after a sublayer; the adapter set is this placement's own or,
    when shared between layers, a child named `shared_adapters` (counted once by the plugin)."""

    def __init__(self, site: Site, adapters: TaskAdapters, shared: bool) -> None:
        super().__init__(site)
        if shared:
            self.shared_adapters = adapters
        else:
            self.adapters = adapters

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        adapters = getattr(self, "shared_adapters", None)
        return (self.adapters if adapters is None else adapters)(h)


class SharedAdapter(Plugin):
    name = "vl_adapter"
    description = "Bottleneck adapters shared across tasks (and optionally layers) for multi-task tuning"
    paper = ("Sung et al., VL-Adapter: Parameter-Efficient Transfer Learning for Vision-and-Language "
             "Tasks, CVPR 2022")
    kinds = ("sequential",)
    recipe = Recipe(lr=1e-3, source=(
        "as Houlsby adapters: 1e-3 on MiniLM, 100 steps: 0.715 test accuracy over 3 seeds (python -m bench "
        "--only zoo)"))

    def __init__(self, tasks: tuple[str, ...] = (), sublayers: tuple[str, ...] = ("attn", "xattn", "ffn"),
                 max_bottleneck: int = 256, activation: str = "relu") -> None:
        self.tasks = tuple(tasks)
        self.sublayers = sublayers
        self.max_bottleneck = max_bottleneck
        self.activation = activation
        bad = [t for t in self.tasks if not t or "." in t or not isinstance(t, str)]
        if bad or len(set(self.tasks)) != len(self.tasks):
            raise PluginError(f"vl_adapter: tasks {list(self.tasks)} must be unique non-empty names without '.'")
        if activation not in ACTIVATIONS:
            raise PluginError(f"vl_adapter: activation {activation!r} is not one of {list(ACTIVATIONS)}")

    def sites(self, graph: Any) -> list[Site]:
        return sublayer_sites(graph, "sequential", self.sublayers)

    def dims(self, site: Site) -> dict[str, Dim]:
        high = max(1, min(self.max_bottleneck, site.out_features))
        return {
            "bottleneck": IntDim("bottleneck", default=min(16, high), low=1, high=high, log=True,
                                 help="width of the down-projection"),
            "share": ChoiceDim("share", default="tasks", choices=("tasks", "none") if self.tasks else ("tasks",),
                               help="'tasks': one adapter for all tasks; 'none': one per task"),
            "share_layers": ChoiceDim("share_layers", default=False, choices=(False, True),
                                      help="one adapter for every placement of this sublayer kind in the stack"),
        }

    # ------------------------------------------------------------------ counting
    def _set_count(self, site: Site, cfg: dict[str, Any]) -> int:
        """Parameters of one adapter set: one bottleneck, or one per task."""
        copies = len(self.tasks) if cfg["share"] == "none" else 1
        return copies * bottleneck_count(site.out_features, cfg["bottleneck"], site.out_features)

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return 0 if cfg["share_layers"] else self._set_count(site, cfg)

    def shared_key(self, site: Site, cfg: dict[str, Any]) -> Any:
        if not cfg["share_layers"]:
            return None
        return (self.name, site.stack, site.role, site.out_features, cfg["bottleneck"], cfg["share"])

    def shared_count(self, site: Site, cfg: dict[str, Any]) -> int:
        return self._set_count(site, cfg) if cfg["share_layers"] else 0

    # ------------------------------------------------------------------ building
    def _adapters(self, site: Site, cfg: dict[str, Any]) -> TaskAdapters:
        tasks = self.tasks if cfg["share"] == "none" else ()
        return TaskAdapters(site.out_features, cfg["bottleneck"], self.activation, tasks)

    def build(self, site: Site, cfg: dict[str, Any]) -> PETLModule:
        key = self.shared_key(site, cfg)
        if key is None:
            return VLAdapterModule(site, self._adapters(site, cfg), shared=False)
        return VLAdapterModule(site, self.shared(key, lambda: self._adapters(site, cfg)), shared=True)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        # the down-projection's input (the sublayer output) and the bottleneck before / after the act
        return shape.tokens * (site.out_features + 2 * cfg["bottleneck"])
