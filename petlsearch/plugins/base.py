"""The plugin protocol: what every parameter-efficient method implements.

A plugin is a method (LoRA, adapters, ...). It names the sites of a model graph it can act on,
the hyperparameters it is sized by, the exact number of trainable parameters a placement costs
(without building anything), and builds the module that a placement adds, on one of the
mechanisms of `petlsearch.plugins.mechanisms`. Every attached module scales its contribution by a
gate, 1 by default, that a differentiable search can drive.

Example (a complete plugin: a learned per-feature offset on the output of every FFN projection)::

    from petlsearch.plugins import OutputDelta, Plugin, IntDim
    from petlsearch.searchspace.sites import node_sites

    class Offset(OutputDelta):
        def __init__(self, site, cfg):
            super().__init__(site)
            self.b = torch.nn.Parameter(torch.zeros(site.out_features))
        def delta(self, x):
            return self.b.expand(*x.shape[:-1], -1)

    class OffsetPlugin(Plugin):
        name, kinds = "offset", ("weight",)
        def sites(self, graph): return node_sites(graph, "weight", roles=("ffn.up", "ffn.down"))
        def dims(self, site): return {}
        def count(self, site, cfg): return site.out_features
        def build(self, site, cfg): return Offset(site, cfg)
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.mechanisms.hooks import PETLModule
from petlsearch.searchspace.dims import Dim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import DEFAULT_RECIPE, Recipe
from petlsearch.searchspace.sites import Site

if TYPE_CHECKING:
    from collections.abc import Iterable

    from petlsearch.searchspace.graph import ModelGraph


class Plugin:
    """A parameter-efficient method: sites, dims, exact counts, and the module it builds.

    Required: `name`, `kinds`, `sites`, `dims`, `count`, `build`. Optional hooks default to
    doing nothing: `prepare` (data-driven plugins, called once before the first `attach`),
    `activation_elements` (for the memory model), and `mergeable` modules implement `merge`.
    `recipe` says how the modules train (their learning rate, with its source); a plugin that
    declares none trains at DEFAULT_RECIPE.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True  # a fresh module leaves the model's outputs unchanged
    needs_data: ClassVar[bool] = False  # True: call prepare(model, batches) before attach
    recipe: ClassVar[Recipe] = DEFAULT_RECIPE

    def sites(self, graph: ModelGraph) -> list[Site]:
        """Every site of `graph` this method can act on."""
        raise NotImplementedError

    def dims(self, site: Site) -> dict[str, Dim]:
        """The searchable hyperparameters at `site`, by name."""
        raise NotImplementedError

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        """The exact number of trainable parameters of a placement, computed without building it."""
        raise NotImplementedError

    def build(self, site: Site, cfg: dict[str, Any]) -> PETLModule:
        """The module for a placement, not yet installed."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional hooks
    def shared_key(self, site: Site, cfg: dict[str, Any]) -> Any:
        """Placements with the same non-None key share one set of parameters (Compacter's slow
        weights, VL-Adapter's shared adapter). The module keeps them as a child named `shared_*`;
        get it with `self.shared(key, factory)` in `build`, which gives every placement the same one."""
        return None

    def shared_count(self, site: Site, cfg: dict[str, Any]) -> int:
        """Trainable parameters of the shared part for `shared_key(site, cfg)`, counted once."""
        return 0

    def shared(self, key: Any, factory: Any) -> nn.Module:
        """The shared module for `key` in the model being attached to, made by `factory()` on first
        use. Caches are per model (weakly keyed, so a dropped model frees them): two models never
        share trained weights through one plugin instance."""
        per_model = self.__dict__.setdefault("_shared_modules", weakref.WeakKeyDictionary())
        scope = self.__dict__.get("_attaching") or self
        cache = per_model.setdefault(scope, {})
        if key not in cache:
            cache[key] = factory()
        return cache[key]

    def prepare(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Look at task data before attaching (Fisher scores, SNIP saliency, feature caches)."""

    def clone(self) -> Plugin:
        """A fresh instance with the same constructor arguments (read back from the attributes they
        are stored under, as scikit-learn's clone does): no prepared data, no shared modules."""
        import inspect

        params = list(inspect.signature(type(self).__init__).parameters.values())[1:]  # after self
        names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return type(self)(**{n: getattr(self, n) for n in names if hasattr(self, n)})

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int | None:
        """Elements this placement's own forward saves for backward, which the memory model adds;
        None (the default): not declared, and the memory model estimates them from the site's kind
        (searchspace.memory, `_own_elements`)."""
        return None

    def added_tokens(self, site: Site, cfg: dict[str, Any]) -> int:
        """Positions this placement adds to its stack's sequence from its layer up (tokens kinds):
        the memory model runs those blocks at the longer length."""
        return 0

    # ------------------------------------------------------------------ provided
    def config(self, site: Site, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
        """`cfg` checked against `dims(site)`, with defaults filled in; unknown keys are errors."""
        dims = self.dims(site)
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(dims)
        if unknown:
            raise PluginError(f"plugin '{self.name}': unknown option(s) {sorted(unknown)}; "
                              f"valid: {sorted(dims)}")
        return {k: d.validate(cfg[k]) if k in cfg else d.default for k, d in dims.items()}

    def attach(self, model: nn.Module, site: Site, cfg: dict[str, Any] | None = None,
               variant: int = 0) -> PETLModule:
        """Build the module for (site, cfg), install it in `model`, and return it. A `variant` k > 0
        is a second module of this plugin at the same site (S3PET's supernet holds several sizes
        of a candidate), installed under its own child name (petl_<plugin>_size<k>)."""
        self._attaching = model  # scope of `shared`
        try:
            module = self.build(site, self.config(site, cfg))
        finally:
            self._attaching = None
        module.plugin_name = f"{self.name}_size{variant}" if variant else self.name
        reference = next(model.get_submodule(site.path).parameters(), None)
        reference = reference if reference is not None else next(model.parameters(), None)
        if reference is not None and reference.device.type != "meta":
            module.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
        module.train(model.training)
        try:
            module.install(model)
        except Exception as exc:
            if not variant:
                raise
            raise PluginError(f"'{self.name}' cannot hold two modules at {site.key} ({exc})") from exc
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
