"""The model side of a structure: placements bound to a model and the handle of what was attached.

`bind(placements, graph, plugins)` gives each placement its `Bound` (plugin instance, Site, config
checked with defaults filled; each plugin's sites found once), `attach(model, bound)` installs them
and returns `Applied`, `count_bound` counts them (shared parts once). `Structure.resolve` / `apply`,
`SearchSpace.bound`, the memory model, a trial and S3PET's supernet all go through these: one bind
path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from petlsearch.errors import PetlsearchError, StructureError, did_you_mean
from petlsearch.files import save_tensors

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    import torch
    from torch import nn

    from petlsearch.plugins.base import Plugin
    from petlsearch.plugins.mechanisms.hooks import PETLModule
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.sites import Site
    from petlsearch.searchspace.structure import Placement


class Bound(NamedTuple):
    """A placement bound to a model: its plugin instance, its site on the model's graph and its
    config checked against the plugin's dims (defaults filled in). What counting, the memory model
    and attaching read."""

    plugin: Plugin
    site: Site
    config: dict[str, Any]


def bind(placements: Sequence[Placement], graph: ModelGraph, plugins: Mapping[str, Plugin],
         sites: dict[str, dict[str, Site]] | None = None) -> list[tuple[Placement, Bound]]:
    """Each placement with its Bound: the one resolver of placements (structures, trials, the
    search space). `sites` (plugin name -> site key -> Site) caches each plugin's sites on `graph`,
    found once; a search space passes its candidates' sites, so that only those bind."""
    missing = sorted({p.plugin for p in placements} - set(plugins))
    if missing:
        raise StructureError(f"no plugin instance for {missing}: pass one per plugin the structure names "
                             "(petlsearch.plugins.plugins_for(structure))")
    sites = {} if sites is None else sites
    out = []
    for p in placements:
        plugin = plugins[p.plugin]
        if p.plugin not in sites:
            sites[p.plugin] = {s.key: s for s in plugin.sites(graph)}
        own = sites[p.plugin]
        if p.site not in own:
            raise StructureError(f"placement {p.key}: the model has no site '{p.site}' for plugin "
                                 f"'{p.plugin}'{did_you_mean(p.site, own)}")
        try:
            cfg = plugin.config(own[p.site], p.config)
        except PetlsearchError as exc:
            raise StructureError(f"placement {p.key}: {exc}") from None
        out.append((p, Bound(plugin, own[p.site], cfg)))
    return out


def attach(model: nn.Module, bound: Sequence[tuple[Placement, Bound]]) -> Applied:
    """Attach each bound placement to `model`: the one way a structure, a trial or S3PET's
    supernet installs modules. A placement key seen again (the supernet's second size of a
    candidate) is installed beside the first (`Plugin.attach`'s `variant`). Nothing stays
    attached when one fails."""
    attached: list[tuple[Placement, PETLModule]] = []
    seen: dict[str, int] = {}
    try:
        for p, (plugin, site, cfg) in bound:
            variant = seen.get(p.key, 0)
            seen[p.key] = variant + 1
            module = plugin.attach(model, site, cfg, variant=variant)
            module.tasks = frozenset(p.tasks) if p.tasks else None
            attached.append((p, module))
    except Exception:
        for _, m in reversed(attached):
            m.uninstall()
        raise
    return Applied(attached)


def count_bound(bound: Iterable[tuple[Plugin, Site, dict[str, Any]]]) -> int:
    """Sum of per-placement counts plus each shared part once (see Plugin.shared_key)."""
    total = 0
    shared: dict[tuple[str, Any], int] = {}
    for plugin, site, cfg in bound:
        total += plugin.count(site, cfg)
        key = plugin.shared_key(site, cfg)
        if key is not None:
            shared[(plugin.name, key)] = plugin.shared_count(site, cfg)
    return total + sum(shared.values())


class Applied:
    """The modules a structure attached: trainable parameters, gates, weights I/O, merge, detach."""

    def __init__(self, modules: list[tuple[Placement, PETLModule]]) -> None:
        self.modules = modules

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for params in self.parameters_by_plugin().values() for p in params]

    def parameters_by_plugin(self) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters grouped by the plugin of their placement (each parameter once), so
        that each plugin's modules train at its own recipe."""
        seen: set[int] = set()
        out: dict[str, list[torch.nn.Parameter]] = {}
        for placement, m in self.modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.setdefault(placement.plugin, []).append(p)
        return out

    def trainable_count(self) -> int:
        """Each module's own count (sparse modules: unmasked entries) plus shared parts once."""
        own = sum(m.trainable_count() for _, m in self.modules)
        shared = {id(p): p.numel() for _, m in self.modules for name, child in m.named_children()
                  if name.startswith("shared_") for p in child.parameters() if p.requires_grad}
        return own + sum(shared.values())

    def set_gates(self, value: float) -> None:
        for _, m in self.modules:
            m.gate = value

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{p.key}/{k}": v.detach().contiguous() for p, m in self.modules for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for p, m in self.modules:
            prefix = f"{p.key}/"
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            missing = set(m.state_dict()) - set(own)
            if missing:
                raise StructureError(f"weights for {p.key} lack {sorted(missing)[:3]}")
            m.load_state_dict(own)

    def save_weights(self, path: str | Path) -> Path:
        state = self.state_dict()
        seen: dict[int, str] = {}
        unique = {}
        for k, v in state.items():  # safetensors refuses shared storage: store each tensor once
            ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
            unique[k] = v.clone() if ptr in seen else v
            seen.setdefault(ptr, k)
        return save_tensors(path, unique)

    def load_weights(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))

    def merge(self) -> None:
        """Fold every module into the frozen weights: the weight updates first (they act on the weight,
        before any hook sees the output), then the hooks in the order they were attached (the order
        they compose in the forward), each into the weight the earlier ones left."""
        modules = [m for _, m in self.modules]
        for m in [m for m in modules if m.on_weight] + [m for m in modules if not m.on_weight]:
            m.merge()
        self.modules = []

    def detach(self) -> None:
        for _, m in reversed(self.modules):
            m.uninstall()
        self.modules = []


# ---------------------------------------------------------------------- validation helpers
