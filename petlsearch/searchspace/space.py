"""SearchSpace: every candidate (site x plugin) of a model with its dims, and budget-aware sampling.

Example::

    graph = ModelGraph.from_model(model)
    space = SearchSpace.from_graph(graph, create_plugins(["lora", "adapter", "bitfit"]), roles=("attn.q", "attn.v", "ffn"))
    budget = Budget.parse("0.1%")
    structure = space.sample(random.Random(0), budget)   # a list of Placements that fits
    assert space.count(structure) <= space.bind(budget).limit
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from petlsearch.errors import BudgetError, PluginError
from petlsearch.searchspace.budget import Budget
from petlsearch.searchspace.bound import Bound, bind, count_bound
from petlsearch.searchspace.structure import Backbone, Placement, Structure

if TYPE_CHECKING:
    from petlsearch.plugins.base import Plugin
    from petlsearch.searchspace.dims import Dim
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.memory import BatchShape
    from petlsearch.searchspace.sites import Site

FLOAT_LEVELS = 10  # a float dim counts as this many distinct values in the space's size


@dataclass(frozen=True)
class Candidate:
    """A plugin at a site, with the dims it can be sized by and its cheapest possible cost."""

    plugin: str
    site: Site
    dims: dict[str, Dim] = field(hash=False, compare=False)
    min_cost: int = 0
    min_config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.site.key}@{self.plugin}"

    def placement(self, config: dict[str, Any]) -> Placement:
        return Placement(self.site.key, self.plugin, dict(config), self.site.role, self.site.layer)


@dataclass(frozen=True)
class SpaceSize:
    candidates: int
    dims: int
    log10_structures: float


class SearchSpace:
    """The candidates of a model for a set of plugins, filtered by role, layer, kind and stack."""

    def __init__(self, graph: ModelGraph, plugins: dict[str, Plugin], candidates: list[Candidate]) -> None:
        self.graph = graph
        self.plugins = plugins
        self.candidates = candidates
        self._by_key = {c.key: c for c in candidates}
        # plugin -> site key -> Site: the candidates' sites, the only ones a placement binds to
        self._sites: dict[str, dict[str, Site]] = {name: {} for name in plugins}
        for c in candidates:
            self._sites[c.plugin][c.site.key] = c.site
        self.backbone_params = graph.num_parameters()
        self.head_params = graph.num_parameters(include_head=True) - self.backbone_params

    @classmethod
    def from_graph(cls, graph: ModelGraph, plugins: Iterable[Plugin], roles: Sequence[str] | None = None,
                   layers: Sequence[int] | None = None, kinds: Sequence[str] | None = None,
                   stacks: Sequence[str] | None = None) -> SearchSpace:
        """Candidates of `plugins` on `graph`. `roles` matches a site's role or its prefix
        ('attn' matches attn.q), `layers` the block index (None keeps sites outside blocks too).
        `plugins` are instances: `petlsearch.plugins.create_plugins(names)` makes them from names."""
        instances = {}
        for plugin in plugins:
            if isinstance(plugin, str):
                raise PluginError(f"SearchSpace.from_graph takes plugin instances, got the name {plugin!r}; "
                                  "make them with petlsearch.plugins.create_plugins(names)")
            instances[plugin.name] = plugin
        if not instances:
            raise PluginError("no plugins given for the search space")
        candidates = []
        for name, plugin in instances.items():
            for site in plugin.sites(graph):
                if not _keep(site, roles, layers, kinds, stacks):
                    continue
                dims = plugin.dims(site)
                smallest = _smallest(plugin, site, dims)
                candidates.append(Candidate(name, site, dims, plugin.count(site, smallest), smallest))
        return cls(graph, instances, candidates)

    # ------------------------------------------------------------------ facts
    def __len__(self) -> int:
        return len(self.candidates)

    def candidate(self, key: str) -> Candidate:
        return self._by_key[key]

    def size(self) -> SpaceSize:
        """Candidates, searchable dims, and log10 of the number of distinct structures."""
        n_dims = sum(len(c.dims) for c in self.candidates)
        log10 = sum(math.log10(1 + _n_configs(c.dims)) for c in self.candidates)
        return SpaceSize(len(self.candidates), n_dims, log10)

    def cost(self, candidate: Candidate, config: dict[str, Any]) -> int:
        return self.plugins[candidate.plugin].count(candidate.site, config)

    def by_cost(self) -> list[Candidate]:
        """Candidates from cheapest to dearest at their smallest size."""
        return sorted(self.candidates, key=lambda c: c.min_cost)

    def count(self, placements: Sequence[Placement]) -> int:
        """Exact trainable parameters of `placements` (shared parts once)."""
        return count_bound(self.bound(placements))

    def memory(self, placements: Sequence[Placement], shape: BatchShape) -> int:
        """Estimated peak training memory in bytes (see searchspace.memory)."""
        from petlsearch.searchspace.memory import estimate

        return estimate(self.graph, self.bound(placements), shape).total

    def bind(self, budget: Budget) -> Budget:
        """`budget` for this space's backbone and head (as it is, when already bound)."""
        return budget if budget.backbone_params is not None else budget.bind(self.backbone_params, self.head_params)

    def fits(self, placements: Sequence[Placement], budget: Budget, shape: BatchShape | None = None) -> bool:
        budget = self.bind(budget)
        memory = self.memory(placements, shape) if budget.memory is not None and shape is not None else None
        return budget.fits(self.count(placements), memory)

    def bound(self, placements: Sequence[Placement]) -> list[Bound]:
        """`placements` bound to this space's candidates (structure.bind, on the candidates' sites)."""
        return [b for _, b in bind(placements, self.graph, self.plugins, self._sites)]

    # ------------------------------------------------------------------ sampling
    def sample_config(self, candidate: Candidate, rng: random.Random) -> dict[str, Any]:
        """Every dim sampled from its own range (so already valid)."""
        return {k: d.sample(rng) for k, d in candidate.dims.items()}

    def sample(self, rng: random.Random, budget: Budget, shape: BatchShape | None = None,
               max_placements: int | None = None) -> list[Placement]:
        """A random structure that fits `budget`: a random number of random candidates, each with a
        random config, added while they fit (a config that does not fit is shrunk to the smallest)."""
        budget = self.bind(budget)
        limit = budget.limit
        pool = [c for c in self.candidates if limit is None or c.min_cost <= limit]
        if not pool:
            cheapest = min((c.min_cost for c in self.candidates), default=0)
            raise BudgetError(f"no candidate fits the budget ({budget.describe()}); "
                              f"the cheapest needs {cheapest:,} parameters")
        k = rng.randint(1, min(len(pool), max_placements or len(pool)))
        chosen: list[Placement] = []
        used, shared = 0, set()
        check_memory = budget.memory is not None and shape is not None
        cheapest = min(c.min_cost for c in pool)
        for cand in rng.sample(pool, k):
            if limit is not None and (limit - used < cheapest):
                break  # nothing else can fit
            if limit is not None and used + cand.min_cost > limit:
                continue
            plugin = self.plugins[cand.plugin]
            for config in (self.sample_config(cand, rng), cand.min_config):
                key = plugin.shared_key(cand.site, config)
                extra = plugin.shared_count(cand.site, config) if key is not None and (cand.plugin, key) not in shared else 0
                cost = used + plugin.count(cand.site, config) + extra
                memory = self.memory([*chosen, cand.placement(config)], shape) if check_memory else None
                if budget.fits(cost, memory):
                    chosen.append(cand.placement(config))
                    used = cost
                    if key is not None:
                        shared.add((cand.plugin, key))
                    break
        return chosen

    def structure(self, placements: Sequence[Placement], budget: Budget | None = None, name: str = "",
                  result: dict[str, Any] | None = None) -> Structure:
        """A Structure file object for `placements` on this space's backbone."""
        res = {"trainable_params": self.count(placements), **(result or {})}
        return Structure(Backbone.of(self.graph, name), list(placements),
                         budget.to_dict() if budget else {}, res)


def _keep(site: Site, roles: Sequence[str] | None, layers: Sequence[int] | None,
          kinds: Sequence[str] | None, stacks: Sequence[str] | None) -> bool:
    if roles is not None and not any(site.role == r or site.role.startswith(r + ".") for r in roles):
        return False
    if layers is not None and site.layer is not None and site.layer not in layers:
        return False
    if kinds is not None and site.kind not in kinds:
        return False
    return stacks is None or site.stack in stacks


def _n_configs(dims: dict[str, Dim]) -> int:
    from petlsearch.searchspace.dims import ChoiceDim, FloatDim, IntDim

    n = 1
    for d in dims.values():
        if isinstance(d, IntDim):
            n *= d.high - d.low + 1
        elif isinstance(d, ChoiceDim):
            n *= len(d.choices)
        elif isinstance(d, FloatDim):
            n *= FLOAT_LEVELS
    return n


def _smallest(plugin: Plugin, site: Site, dims: dict[str, Dim]) -> dict[str, Any]:
    """The cheapest size of a candidate: each integer dim that changes the count (a rank, a
    bottleneck) at its low end; the others (a scaling alpha) keep their defaults."""
    from petlsearch.searchspace.dims import IntDim

    cfg = plugin.config(site)
    for k, d in dims.items():
        if isinstance(d, IntDim) and d.low != cfg[k]:
            lower = {**cfg, k: d.low}
            if plugin.count(site, lower) < plugin.count(site, cfg):
                cfg = lower
    return cfg
