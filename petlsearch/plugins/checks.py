"""The conformance kit's checks: one `check_<property>(plugin, family)` each, on the tiny model of a
family; `petlsearch.plugins.testing` runs them (`check_plugin`, `PluginConformance`)."""

from __future__ import annotations

import copy
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import PETLModule
from petlsearch.plugins.registry import validate
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.sites import Site

FAMILIES = tuple(tiny.FAMILIES)
MAX_SITES = 4  # sites checked per family: first, last and two in between, to stay fast


class ConformanceError(AssertionError):
    pass


class CheckSkipped(Exception):
    """A check that does not apply to this plugin (or family); the message says why."""


def _fail(plugin: Plugin, check: str, family: str, msg: str) -> None:
    raise ConformanceError(f"[{plugin.name}] {check} on {family}: {msg}")


def _spread(sites: list[Site], n: int = MAX_SITES) -> list[Site]:
    if len(sites) <= n:
        return sites
    step = (len(sites) - 1) / (n - 1)
    return [sites[round(i * step)] for i in range(n)]


def _setup(plugin: Plugin, family: str) -> tuple[torch.nn.Module, ModelGraph, dict, list[Site]]:
    model = tiny.FAMILIES[family]()
    for p in model.parameters():
        p.requires_grad_(False)
    graph = ModelGraph.from_model(model)
    inputs = tiny.inputs(family)
    if plugin.needs_data:
        plugin.prepare(model, [labelled(model, family, inputs)])
    return model, graph, inputs, _spread(plugin.sites(graph))


def labelled(model: torch.nn.Module, family: str, inputs: dict) -> dict:
    """`inputs` with labels, for data-driven plugins: class ids for classifiers, the tokens for LMs."""
    batch = next(iter(inputs.values())).shape[0]
    if family in ("bert", "vit"):
        return {**inputs, "labels": torch.arange(batch) % model.config.num_labels}
    if family in ("gpt2", "llama"):
        return {**inputs, "labels": inputs["input_ids"]}
    if family == "t5":
        return {**inputs, "labels": inputs["decoder_input_ids"].contiguous()}  # T5's loss views its labels
    return inputs  # CLIP: contrastive, no labels


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return tiny.output_tensor(model(**inputs)).float()


def _perturb(module: PETLModule, seed: int = 0) -> None:
    """Move every trainable tensor away from its initialisation, so that the module has an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _sample_cfg(plugin: Plugin, site: Site, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    return plugin.config(site, {k: d.sample(rng) for k, d in plugin.dims(site).items()})


def _attach_all(plugin: Plugin, model: torch.nn.Module, sites: list[Site], seed: int = 0) -> list[tuple[Site, dict, PETLModule]]:
    out = []
    for i, site in enumerate(sites):
        cfg = _sample_cfg(plugin, site, seed + i)
        out.append((site, cfg, plugin.attach(model, site, cfg)))
    return out


def check_registration(plugin: Plugin, family: str) -> None:
    """The class has a valid name, kinds, and the required methods with the right signatures."""
    validate(type(plugin))


def check_recipe(plugin: Plugin, family: str) -> None:
    """The declared recipe (how the modules train) is a Recipe with positive finite rates, a weight
    decay >= 0 and a source; a plugin that declares none has DEFAULT_RECIPE, which passes."""
    from petlsearch.errors import PluginError
    from petlsearch.searchspace.recipe import check_recipe as valid

    try:
        valid(plugin.recipe, plugin.name)
    except PluginError as exc:
        _fail(plugin, "check_recipe", family, f"{exc}; declare a valid petlsearch.searchspace.recipe.Recipe")


def check_sites(plugin: Plugin, family: str) -> None:
    """Sites are of the plugin's kinds and have unique keys."""
    _, graph, _, _ = _setup(plugin, family)
    sites = plugin.sites(graph)
    keys = [s.key for s in sites]
    if len(keys) != len(set(keys)):
        _fail(plugin, "check_sites", family, "two sites share a key; make site names unique")
    bad = [s.key for s in sites if s.kind not in plugin.kinds]
    if bad:
        _fail(plugin, "check_sites", family, f"sites {bad[:3]} are of a kind not in {plugin.kinds}")


def check_count_exact(plugin: Plugin, family: str) -> None:
    """count(site, cfg) equals the trainable parameters the built module adds, for sampled configs."""
    model, _, _, sites = _setup(plugin, family)
    before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attached = _attach_all(plugin, model, sites, seed=3)
    for site, cfg, module in attached:
        expected = plugin.count(site, cfg)
        if module.trainable_count() != expected:
            _fail(plugin, "check_count_exact", family,
                  f"site {site.key} cfg {cfg}: count() = {expected} but the module has {module.trainable_count()}")
    dense = all(m.trainable_count() == sum(p.numel() for p in m.parameters() if p.requires_grad)
                for _, _, m in attached)
    added = sum(p.numel() for p in model.parameters() if p.requires_grad) - before
    counted = sum(plugin.count(site, cfg) for site, cfg, _ in attached)
    shared = {plugin.shared_key(site, cfg): plugin.shared_count(site, cfg) for site, cfg, _ in attached}
    counted += sum(n for key, n in shared.items() if key is not None)
    if dense and added != counted:  # sparse modules count unmasked entries only
        _fail(plugin, "check_count_exact", family, f"model gained {added} trainable parameters, count() says {counted}")


def _modules(model: torch.nn.Module) -> list[PETLModule]:
    return [m for m in model.modules() if isinstance(m, PETLModule)]


def check_identity_at_init(plugin: Plugin, family: str) -> None:
    """A freshly attached module leaves the outputs unchanged (where the method defines it)."""
    if not plugin.identity_at_init:
        raise CheckSkipped("the plugin declares identity_at_init = False: its modules change the outputs at init "
                           "by design")
    model, _, inputs, sites = _setup(plugin, family)
    base = _run(model, inputs)
    _attach_all(plugin, model, sites)
    out = _run(model, inputs)
    if not torch.allclose(out, base, atol=1e-5, rtol=1e-4):
        _fail(plugin, "check_identity_at_init", family,
              f"outputs moved by {(out - base).abs().max():.2e} at init; initialise the update to zero")


def check_gate_zero(plugin: Plugin, family: str) -> None:
    """With every gate at 0 the model gives its original outputs; at 1 (after training) it does not."""
    model, _, inputs, sites = _setup(plugin, family)
    base = _run(model, inputs)
    attached = _attach_all(plugin, model, sites)
    for _, _, m in attached:
        _perturb(m)
    moved = _run(model, inputs)
    for _, _, m in attached:
        m.gate = 0.0
    off = _run(model, inputs)
    if not torch.allclose(off, base, atol=1e-5, rtol=1e-4):
        _fail(plugin, "check_gate_zero", family, f"gate 0 still changes outputs by {(off - base).abs().max():.2e}")
    for _, _, m in attached:
        m.gate = torch.tensor(0.0)
    off_t = _run(model, inputs)
    if not torch.allclose(off_t, base, atol=1e-5, rtol=1e-4):
        _fail(plugin, "check_gate_zero", family, "a tensor gate of 0 still changes outputs")
    if moved.shape == base.shape and torch.allclose(moved, base, atol=1e-6):  # tokens may change the length
        _fail(plugin, "check_gate_zero", family, "perturbed modules have no effect at gate 1")


def check_detach(plugin: Plugin, family: str) -> None:
    """uninstall() restores the model exactly: same parameter names, same outputs, no hooks left."""
    model, _, inputs, sites = _setup(plugin, family)
    names = [n for n, _ in model.named_parameters()]
    base = _run(model, inputs)
    attached = _attach_all(plugin, model, sites)
    for _, _, m in attached:
        _perturb(m)
    for _, _, m in reversed(attached):
        m.uninstall()
    if [n for n, _ in model.named_parameters()] != names:
        _fail(plugin, "check_detach", family, "parameter names differ after uninstall")
    if _modules(model):
        _fail(plugin, "check_detach", family, "PETL modules remain registered after uninstall")
    if not torch.equal(_run(model, inputs), base):
        _fail(plugin, "check_detach", family, "outputs differ after uninstall")


def check_state_roundtrip(plugin: Plugin, family: str) -> None:
    """Module state saved in safetensors and loaded into a fresh placement reproduces the outputs."""
    from safetensors.torch import load_file, save_file

    model, _, inputs, sites = _setup(plugin, family)
    fresh = copy.deepcopy(model)
    attached = _attach_all(plugin, model, sites)
    for i, (_, _, m) in enumerate(attached):
        _perturb(m, seed=i)
    expected = _run(model, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.safetensors"
        # cloned: placements that share parameters (shared_key) would otherwise alias tensors
        state = {f"{i}.{k}": v.detach().clone(memory_format=torch.contiguous_format)
                 for i, (_, _, m) in enumerate(attached) for k, v in m.state_dict().items()}
        save_file(state, str(path))
        loaded = load_file(str(path))
    for i, (site, cfg, _) in enumerate(attached):
        m = plugin.attach(fresh, site, cfg)
        m.load_state_dict({k[len(f"{i}."):]: v for k, v in loaded.items() if k.startswith(f"{i}.")})
    got = _run(fresh, inputs)
    if not torch.allclose(got, expected, atol=1e-6):
        _fail(plugin, "check_state_roundtrip", family, f"outputs differ by {(got - expected).abs().max():.2e}")


def check_merge(plugin: Plugin, family: str) -> None:
    """merge() folds the modules into the weights with the same outputs (mergeable plugins)."""
    if not plugin.mergeable:
        raise CheckSkipped("the plugin is not mergeable (mergeable = False): its modules stay hooks")
    model, _, inputs, sites = _setup(plugin, family)
    attached = _attach_all(plugin, model, sites)
    for _, _, m in attached:
        _perturb(m)
    expected = _run(model, inputs)
    for _, _, m in attached:
        m.merge()
    if _modules(model):
        _fail(plugin, "check_merge", family, "modules remain after merge()")
    got = _run(model, inputs)
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        _fail(plugin, "check_merge", family, f"merged outputs differ by {(got - expected).abs().max():.2e}")


def check_meta_count(plugin: Plugin, family: str) -> None:
    """Sites and counts work on a model built on the meta device (no memory, no build)."""
    with torch.device("meta"):
        model = tiny.FAMILIES[family]()
    graph = ModelGraph.from_model(model)
    for site in plugin.sites(graph):
        n = plugin.count(site, plugin.config(site))
        if not isinstance(n, int) or n < 0:
            _fail(plugin, "check_meta_count", family, f"count() returned {n!r} at {site.key}; return an int >= 0")


def check_clone(plugin: Plugin, family: str) -> None:
    """clone() gives a fresh instance of the same class with the same constructor arguments: the
    same sites and dims (every trial and the supernet start from clones)."""
    twin = plugin.clone()
    if type(twin) is not type(plugin) or twin is plugin:
        _fail(plugin, "check_clone", family, "clone() must return a new instance of the same class")
    _, graph, _, _ = _setup(plugin, family)
    mine, theirs = [s.key for s in plugin.sites(graph)], [s.key for s in twin.sites(graph)]
    if mine != theirs:
        _fail(plugin, "check_clone", family, "a clone has other sites: store every constructor argument under "
                                              "its own name (self.<arg> = <arg>) so that clone() can read it back")
    for site in plugin.sites(graph)[:MAX_SITES]:
        if plugin.config(site) != twin.config(site):
            _fail(plugin, "check_clone", family, f"a clone has other default configs at {site.key}: store every "
                                                  "constructor argument under its own name")


def check_sites_stable(plugin: Plugin, family: str) -> None:
    """The site keys are the same, in the same order, on a fresh copy of the model: a structure
    file names sites by key and must find them again."""
    _, graph, _, _ = _setup(plugin, family)
    again = ModelGraph.from_model(tiny.FAMILIES[family]())
    first, second = [s.key for s in plugin.sites(graph)], [s.key for s in plugin.clone().sites(again)]
    if first != second:
        _fail(plugin, "check_sites_stable", family, f"site keys differ on a fresh model ({first[:2]} vs "
                                                     f"{second[:2]}); derive them from module names only")


def check_dim_defaults(plugin: Plugin, family: str) -> None:
    """Every dim's default is one of its own valid values, and the default config counts."""
    _, graph, _, sites = _setup(plugin, family)
    for site in sites:
        for name, dim in plugin.dims(site).items():
            try:
                ok = dim.validate(dim.default) == dim.default
            except Exception as exc:  # noqa: BLE001 - reported with the dim's name
                ok, why = False, f" ({exc})"
            else:
                why = ""
            if not ok:
                _fail(plugin, "check_dim_defaults", family, f"dim '{name}' at {site.key}: default {dim.default!r} "
                                                            f"is not a valid value{why}; pick a default inside "
                                                            "its range or choices")
        n = plugin.count(site, plugin.config(site))
        if not isinstance(n, int) or n < 0:
            _fail(plugin, "check_dim_defaults", family, f"count() of the default config at {site.key} is {n!r}; "
                                                        "return an int >= 0")


def check_memory_hooks(plugin: Plugin, family: str) -> None:
    """activation_elements (None or an int >= 0) and added_tokens (an int >= 0) answer for sampled
    configs: the memory model adds what they say."""
    from petlsearch.searchspace.memory import BatchShape

    _, _, _, sites = _setup(plugin, family)
    shape = BatchShape(2, 8)
    for i, site in enumerate(sites):
        cfg = _sample_cfg(plugin, site, i)
        elements, tokens = plugin.activation_elements(site, cfg, shape), plugin.added_tokens(site, cfg)
        if elements is not None and (not isinstance(elements, int) or elements < 0):
            _fail(plugin, "check_memory_hooks", family, f"activation_elements() at {site.key} is {elements!r}; "
                                                        "return None (not declared) or an int >= 0")
        if not isinstance(tokens, int) or tokens < 0:
            _fail(plugin, "check_memory_hooks", family, f"added_tokens() at {site.key} is {tokens!r}; "
                                                        "return an int >= 0")


CHECKS: dict[str, Callable[[Plugin, str], None]] = {
    f.__name__: f for f in (check_registration, check_recipe, check_sites, check_count_exact, check_identity_at_init,
                            check_gate_zero, check_detach, check_state_roundtrip, check_merge, check_meta_count,
                            check_clone, check_sites_stable, check_dim_defaults, check_memory_hooks)
}
