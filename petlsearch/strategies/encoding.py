"""A PETL structure encoded as the parameters of a black-box trial (Optuna, Ray Tune's OptunaSearch).

The candidates of a SearchSpace are partitioned into groups. Each group is one categorical
parameter, ``"<group> method"`` in ``["none", plugin, ...]``; when a plugin is chosen, that plugin's
dims are asked once for the group (``"<group> <plugin>.<dim>"``, through each Dim's ``suggest``) and
shared by all of the plugin's candidates in the group. Groupings:

- ``candidate``: one group per candidate (site x plugin); exact, for small spaces.
- ``role``: one group per (plugin, stack, role, layer bucket), e.g. LoRA on attn.q of layers 0-2;
  plugins may stack on a site. This keeps a 12-layer model at a few dozen parameters.
- ``place``: one group per (stack, role, layer bucket) holding one method chosen among the plugins.
- ``auto`` (default): ``candidate`` up to `max_candidates` candidates, else ``role``.

A decoded structure over the budget is repaired deterministically (so the objective stays a
function of the parameters): the dearest placement is shrunk first (each integer dim that lowers
its cost is halved toward its low end), until it fits or everything is at its smallest; then the
dearest placements are dropped. With ``infeasible="reject"`` such a structure is rejected instead.
An empty structure is always rejected. Rejected structures are never trained nor returned.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from petlsearch.errors import PetlsearchError, did_you_mean
from petlsearch.searchspace.dims import IntDim

if TYPE_CHECKING:
    from petlsearch.searchspace.budget import Budget
    from petlsearch.searchspace.dims import Dim
    from petlsearch.searchspace.memory import BatchShape
    from petlsearch.searchspace.space import Candidate, SearchSpace
    from petlsearch.searchspace.structure import Placement

GROUPINGS = ("auto", "candidate", "role", "place")
LR_PARAM = "lr scale"  # the trial parameter of the learning-rate scale, when it is searched
INFEASIBLE = ("repair", "reject")
NONE = "none"


@dataclass(frozen=True)
class Group:
    """Candidates decided together: `members[plugin]` all get the plugin's one config."""

    key: str
    members: dict[str, tuple[Candidate, ...]]

    @property
    def method_param(self) -> str:
        return f"{self.key} method"

    def dim_param(self, plugin: str, dim: str) -> str:
        return f"{self.key} {plugin}.{dim}"

    def dims(self, plugin: str) -> dict[str, Dim]:
        return self.members[plugin][0].dims


class Encoding:
    """Maps trial parameters to a structure that fits `budget` (see the module docstring).

    >>> enc = Encoding(space, budget)                       # doctest: +SKIP
    >>> params = enc.suggest(optuna_trial)                  # doctest: +SKIP
    >>> placements = enc.decode(params)  # None: rejected   # doctest: +SKIP
    """

    def __init__(self, space: SearchSpace, budget: Budget, shape: BatchShape | None = None,
                 group_by: str = "auto", buckets: int = 4, max_candidates: int = 24,
                 infeasible: str = "repair", lr_scales: tuple[float, float] | None = None) -> None:
        if group_by not in GROUPINGS:
            raise PetlsearchError(f"unknown grouping '{group_by}'{did_you_mean(group_by, GROUPINGS)}; "
                                  f"choose one of {', '.join(GROUPINGS)}")
        if infeasible not in INFEASIBLE:
            raise PetlsearchError(f"infeasible='{infeasible}' is not one of {', '.join(INFEASIBLE)}")
        if buckets < 1:
            raise PetlsearchError(f"buckets must be at least 1, got {buckets}")
        self.space, self.budget, self.buckets, self.infeasible = space, space.bind(budget), buckets, infeasible
        self.lr_scales = tuple(lr_scales) if lr_scales is not None else None
        self.shape = shape if budget.memory is not None else None
        if group_by == "auto":
            group_by = "candidate" if len(space) <= max_candidates else "role"
        self.group_by = group_by
        self.groups = _make_groups(space.candidates, group_by, buckets)
        self.rejections: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------------ trial side
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask `trial` (optuna.Trial, define-by-run) for every parameter; returns those asked."""
        params: dict[str, Any] = {}
        if self.lr_scales is not None:
            params[LR_PARAM] = trial.suggest_float(LR_PARAM, *self.lr_scales, log=True)
        for g in self.groups:
            method = trial.suggest_categorical(g.method_param, [NONE, *g.members])
            params[g.method_param] = method
            if method != NONE:
                for name, dim in g.dims(method).items():
                    key = g.dim_param(method, name)
                    params[key] = dim.suggest(trial, key)
        return params

    def signature(self) -> str:
        """A digest of the parameter names and ranges; a resumed study must have the same one."""
        text = repr([(g.method_param, list(g.members), {p: repr(g.dims(p)) for p in g.members})
                     for g in self.groups])
        if self.lr_scales is not None:
            text += repr((LR_PARAM, self.lr_scales))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ decoding
    def train(self, params: dict[str, Any]) -> dict[str, float]:
        """The training settings the parameters name: {"lr_scale": x} when it is searched, else {}."""
        return {"lr_scale": float(params[LR_PARAM])} if LR_PARAM in params else {}

    def raw(self, params: dict[str, Any]) -> list[Placement]:
        """The structure the parameters name, before any budget repair."""
        out = []
        for g in self.groups:
            method = params.get(g.method_param, NONE)
            if method == NONE:
                continue
            if method not in g.members:
                raise PetlsearchError(f"parameter '{g.method_param}'={method!r} is not one of {list(g.members)}")
            values = {name: params[g.dim_param(method, name)] for name in g.dims(method)}
            plugin = self.space.plugins[method]
            out.extend(c.placement(plugin.config(c.site, values)) for c in g.members[method])
        return out

    def decode(self, params: dict[str, Any]) -> list[Placement] | None:
        """A structure that fits the budget, or None when it is rejected (empty, or over budget with
        infeasible='reject'); the reason is counted in `self.rejections`."""
        placements = self.raw(params)
        if not self.fits(placements):
            if self.infeasible == "reject":
                self.rejections["over budget"] += 1
                return None
            placements = self.repair(placements)
        if not placements:
            self.rejections["empty"] += 1
            return None
        return placements

    def fits(self, placements: Sequence[Placement]) -> bool:
        return self.space.fits(placements, self.budget, self.shape)

    def repair(self, placements: Sequence[Placement]) -> list[Placement]:
        """Shrink the dearest placements, then drop the dearest, until the structure fits."""
        items = list(placements)
        costs = [self.space.count([p]) for p in items]
        limit = self.budget.limit
        # without shared parts the sum of single counts is exact, so most checks need no recount
        exact = not any(self.space.plugins[p.plugin].shared_key(self.space.candidate(p.candidate_key).site, p.config)
                        is not None for p in items)

        def ok() -> bool:
            if exact and limit is not None and sum(costs) > limit:
                return False
            return self.fits(items)

        heap = [(-c, i) for i, c in enumerate(costs)]
        heapq.heapify(heap)
        while heap and not ok():
            _, i = heapq.heappop(heap)  # the dearest placement that can still shrink
            shrunk = self._shrink(items[i])
            if shrunk is not None:
                items[i], costs[i] = shrunk, self.space.count([shrunk])
                heapq.heappush(heap, (-costs[i], i))
        while items and not ok():
            i = max(range(len(items)), key=lambda j: (costs[j], -j))
            del items[i], costs[i]
        return items

    def _shrink(self, placement: Placement) -> Placement | None:
        """The placement with each cost-bearing integer dim halved toward its low end, or None."""
        cand = self.space.candidate(placement.key)
        plugin = self.space.plugins[cand.plugin]
        config, cost = dict(placement.config), plugin.count(cand.site, placement.config)
        start = cost
        for name, dim in cand.dims.items():
            value = config.get(name)
            if not isinstance(dim, IntDim) or value is None or value <= dim.low:
                continue
            trial = {**config, name: max(dim.low, math.floor(value / 2))}
            trial_cost = plugin.count(cand.site, trial)
            if trial_cost < cost:  # only dims that size the module (a LoRA rank, not its alpha)
                config, cost = trial, trial_cost
        return cand.placement(config) if cost < start else None


def _make_groups(candidates: Sequence[Candidate], group_by: str, buckets: int) -> list[Group]:
    """Groups in a stable order; a group's candidates of one plugin share equal dims (split if not)."""
    depth: dict[str, int] = defaultdict(int)
    for c in candidates:
        if c.site.layer is not None:
            depth[c.site.stack] = max(depth[c.site.stack], c.site.layer + 1)
    grouped: dict[str, dict[str, list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in candidates:
        grouped[_group_key(c, group_by, depth, buckets)][c.plugin].append(c)
    groups = []
    for key, by_plugin in grouped.items():
        main: dict[str, tuple[Candidate, ...]] = {}
        for plugin, members in by_plugin.items():
            parts: dict[str, list[Candidate]] = defaultdict(list)
            for c in members:
                parts[repr(sorted(c.dims.items()))].append(c)
            chunks = list(parts.values())
            main[plugin] = tuple(chunks[0])
            # candidates whose dims differ (another range at another site) get a group of their own
            groups.extend(Group(f"{key}#{plugin}{i}", {plugin: tuple(chunk)}) for i, chunk in enumerate(chunks[1:], 1))
        groups.append(Group(key, main))
    return sorted(groups, key=lambda g: g.key)


def _group_key(c: Candidate, group_by: str, depth: dict[str, int], buckets: int) -> str:
    if group_by == "candidate":
        return c.key
    site = c.site
    where = f"{site.stack}.{site.role}"
    if site.layer is not None:
        size = math.ceil(depth[site.stack] / min(buckets, depth[site.stack]))
        lo = site.layer // size * size
        hi = min(lo + size, depth[site.stack]) - 1
        where += f"@L{lo}" if lo == hi else f"@L{lo}-{hi}"
    return where if group_by == "place" else f"{c.plugin}@{where}"
