"""The supernet's arms: each candidate of the space at the size(s) it is searched at under a budget.

sizes=1 keeps every candidate at its default size, sizes=n offers up to n sizes as separate arms,
and sizes="auto" (the default) scales every default so that the whole space costs a few budgets
(`auto_scale`) and leaves out arms that would fill most of the budget alone (`_held`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from petlsearch.errors import PetlsearchError
from petlsearch.searchspace.dims import IntDim

if TYPE_CHECKING:
    from petlsearch.plugins.base import Plugin
    from petlsearch.plugins.mechanisms.hooks import PETLModule
    from petlsearch.searchspace.budget import Budget
    from petlsearch.searchspace.memory import BatchShape
    from petlsearch.searchspace.space import Candidate, SearchSpace
    from petlsearch.searchspace.structure import Placement


@dataclass
class Arm:
    """One supernet candidate: a placement at a fixed size, its parameter cost n_i, its module."""

    name: str
    placement: Placement
    cost: float
    candidate: Candidate
    module: PETLModule | None = None



AUTO = "auto"
# sizes="auto": the whole space at one size costs at most this many budgets; a space that costs
# more starts its warm-up at this ratio (Constraint.start)
SPACE_RATIO = 4
SCALES = tuple(2.0 ** k for k in range(3, -7, -1))  # x8 .. x1/64 of each default size
MIN_HELD = 2  # sizes="auto": the budget holds at least this many of each candidate


def expand_arms(space: SearchSpace, budget: Budget, shape: BatchShape, sizes: int | str) -> list[Arm]:
    """Each candidate at one size (sizes=1: its default; "auto": its default scaled to the budget,
    see auto_scale) or at up to `sizes` sizes. A size that cannot fit the budget on its own is left
    out; when none fits, the candidate's smallest size is tried. Under "auto" so is an arm that
    alone costs more than 1 / MIN_HELD of the parameter budget (see _held)."""
    scale = auto_scale(space, budget) if sizes == AUTO else None
    arms = []
    for cand in space.candidates:
        plugin = space.plugins[cand.plugin]
        dims = _size_dims(plugin, cand) if sizes != 1 else []
        configs = [scaled_config(plugin, cand, scale, dims)] if scale is not None else size_configs(plugin, cand, sizes)
        kept = [c for c in configs if space.fits([cand.placement(c)], budget, shape)]
        smallest = plugin.config(cand.site, cand.min_config)
        if not kept and space.fits([cand.placement(smallest)], budget, shape):
            kept = [smallest]
        for cfg in kept:
            size = ",".join(f"{k}={cfg[k]}" for k in dims)
            arms.append(Arm(f"{cand.key}[{size}]" if size else cand.key, cand.placement(cfg), 0.0, cand))
    _set_param_costs(space, arms)
    if sizes == AUTO:
        arms = _held(space, arms, space.bind(budget).limit)
    return arms


def _held(space: SearchSpace, arms: list[Arm], limit: int | None) -> list[Arm]:
    """The arms that the budget holds MIN_HELD of, unless none. A search chooses among candidates
    the budget holds several of; one that fills most of it on its own is a structure, not a part,
    and searches that ranked such an arm first kept it alone and scored below the structures of
    smaller parts (docs/benchmarks.md, "No arm that fills most of the budget")."""
    if limit is None:
        return arms
    held = [a for a in arms if a.cost <= limit / MIN_HELD]
    if not held or len(held) == len(arms):
        return arms
    _set_param_costs(space, held)  # a shared part is now split among fewer arms
    return held


def auto_scale(space: SearchSpace, budget: Budget) -> float:
    """The largest of SCALES at which the whole space (every candidate at its default size times
    the scale) costs at most SPACE_RATIO parameter budgets, or the smallest scale. The search then
    chooses among candidates that the budget can hold several of: at the default sizes a budget of
    0.1% of MiniLM holds three LoRAs of rank 8, where the authors' space is LoRA of rank 1 at every
    projection. 1 (the defaults) under a memory budget alone."""
    limit = space.bind(budget).limit
    if limit is None:
        return 1.0
    sized = [(space.plugins[c.plugin], c, _size_dims(space.plugins[c.plugin], c)) for c in space.candidates]
    for scale in SCALES:
        total = sum(plugin.count(c.site, scaled_config(plugin, c, scale, dims)) for plugin, c, dims in sized)
        if total <= SPACE_RATIO * limit:
            return scale
    return SCALES[-1]


def scaled_config(plugin: Plugin, cand: Candidate, scale: float, dims: list[str] | None = None) -> dict[str, Any]:
    """The candidate's default config with each size dim (`dims`, default: _size_dims) times
    `scale`, rounded into its range."""
    default = plugin.config(cand.site)
    dims = _size_dims(plugin, cand) if dims is None else dims
    return plugin.config(cand.site, {k: min(cand.dims[k].high, max(cand.dims[k].low, round(default[k] * scale)))
                                     for k in dims})


def size_configs(plugin: Plugin, cand: Candidate, n: int) -> list[dict[str, Any]]:
    """Up to `n` configs from small to large: the dims that change the count move together along
    their Dim.values(n); other dims keep their defaults. n=1: the default config."""
    default = plugin.config(cand.site)
    dims = _size_dims(plugin, cand)
    if n <= 1 or not dims:
        return [default]
    values = {k: cand.dims[k].values(n) for k in dims}
    configs, counts = [], set()
    for j in range(n):
        override = {k: v[round(j * (len(v) - 1) / (n - 1))] for k, v in values.items()}
        try:
            cfg = plugin.config(cand.site, override)
        except PetlsearchError:
            continue
        count = plugin.count(cand.site, cfg)
        if count not in counts:
            counts.add(count)
            configs.append(cfg)
    return configs or [default]


def _size_dims(plugin: Plugin, cand: Candidate) -> list[str]:
    """Integer dims whose value changes the candidate's parameter count (LoRA's rank, not alpha)."""
    out = []
    for k, d in cand.dims.items():
        if isinstance(d, IntDim) and d.low < d.high:
            try:
                low = plugin.count(cand.site, plugin.config(cand.site, {k: d.low}))
                high = plugin.count(cand.site, plugin.config(cand.site, {k: d.high}))
            except PetlsearchError:
                continue
            if low != high:
                out.append(k)
    return out


def _set_param_costs(space: SearchSpace, arms: list[Arm]) -> None:
    """n_i = the arm's own count plus its share of a part shared between placements (split
    evenly over the arms that share it; the discretisation counts it exactly, once)."""
    sharing: dict[tuple[str, Any], list[Arm]] = {}
    for arm in arms:
        plugin, site, cfg = space.plugins[arm.placement.plugin], arm.candidate.site, arm.placement.config
        arm.cost = float(plugin.count(site, cfg))
        key = plugin.shared_key(site, cfg)
        if key is not None:
            sharing.setdefault((plugin.name, key), []).append(arm)
    for group in sharing.values():
        first = group[0]
        shared = space.plugins[first.placement.plugin].shared_count(first.candidate.site, first.placement.config)
        for arm in group:
            arm.cost += shared / len(group)
