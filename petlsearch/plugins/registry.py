"""Where plugins come from: the `petlsearch.plugins` entry-point group, `register()`, or an explicit
`package.module:Class`. Built-in plugins register through the same entry points as a third party's.

Listing names reads entry-point metadata only (no torch import); a plugin's class is imported
when it is first asked for, and checked then, so a malformed plugin fails with its name.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import logging
import re
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from petlsearch.errors import PluginError, did_you_mean
from petlsearch.searchspace.recipe import check_recipe

if TYPE_CHECKING:
    from petlsearch.plugins.base import Plugin
    from petlsearch.searchspace.structure import Structure

GROUP = "petlsearch.plugins"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_REQUIRED = {"sites": 1, "dims": 1, "count": 2, "build": 2}

log = logging.getLogger(__name__)
_classes: dict[str, type[Plugin]] = {}  # registered or loaded, by name
_entry_points: dict[str, EntryPoint] | None = None


def _discover() -> dict[str, EntryPoint]:
    """Entry points of the group by name; two distributions with one name is an error."""
    global _entry_points
    if _entry_points is None:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=GROUP):
            if ep.name in found and found[ep.name].value != ep.value:
                a, b = _dist(found[ep.name]), _dist(ep)
                raise PluginError(f"two plugins are named '{ep.name}': {found[ep.name].value} (from {a}) "
                                  f"and {ep.value} (from {b}); uninstall one of the packages")
            found[ep.name] = ep
        _entry_points = found
    return _entry_points


def _dist(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "unknown package"


def validate(cls: Any, name: str | None = None) -> None:
    """Check a plugin class at registration: its name, kinds, and the methods and signatures it must
    define. Raises PluginError naming the plugin and what to change."""
    from petlsearch.plugins.base import Plugin
    from petlsearch.searchspace.sites import SITE_KINDS

    label = name or getattr(cls, "__name__", repr(cls))
    if not (inspect.isclass(cls) and issubclass(cls, Plugin)):
        raise PluginError(f"plugin '{label}': {cls!r} is not a subclass of petlsearch.plugins.Plugin")
    if not isinstance(cls.name, str) or not _NAME.match(cls.name):
        raise PluginError(f"plugin '{label}': name {cls.name!r} must match {_NAME.pattern}")
    if not cls.kinds or set(cls.kinds) - set(SITE_KINDS):
        raise PluginError(f"plugin '{cls.name}': kinds {cls.kinds!r} must be a non-empty subset of {SITE_KINDS}")
    check_recipe(cls.recipe, cls.name)
    for method, n_args in _REQUIRED.items():
        impl = getattr(cls, method)
        if impl is getattr(Plugin, method):
            raise PluginError(f"plugin '{cls.name}': must define {method}()")
        params = [p for p in inspect.signature(impl).parameters.values() if p.name != "self"]
        positional = [p for p in params if p.default is inspect.Parameter.empty
                      and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) != n_args:
            raise PluginError(f"plugin '{cls.name}': {method}() must take {n_args} argument(s) "
                              f"besides self, it takes {[p.name for p in positional]}")


def register(cls: type[Plugin] | None = None, *, replace: bool = False) -> Any:
    """Register a plugin class from code (usable as a decorator). Returns the class."""
    def do(c: type[Plugin]) -> type[Plugin]:
        validate(c)
        existing = _classes.get(c.name)
        installed = _discover().get(c.name)
        other = _where(existing) if existing is not None and existing is not c else (
            f"{installed.value} (from {_dist(installed)})" if installed is not None
            and installed.value != _where(c) and existing is not c else None)
        if other is not None and not replace:
            raise PluginError(f"two plugins are named '{c.name}': {other} and {_where(c)}; "
                              "pass replace=True to override")
        _classes[c.name] = c
        return c
    return do(cls) if cls is not None else do


def _where(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def load_spec(spec: str) -> type[Plugin]:
    """Import `package.module:Class` (only that form: nothing is evaluated) and register it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise PluginError(f"plugin spec {spec!r} must look like 'package.module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"cannot load plugin {spec!r}: {exc}") from exc
    return register(cls, replace=True)


def list_plugins(pattern: str = "*") -> list[str]:
    """Names of the installed and registered plugins matching a glob, without importing them."""
    names = set(_discover()) | set(_classes)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def get_plugin_class(name: str) -> type[Plugin]:
    """The class of plugin `name` (imported on first use); 'module:Class' loads that class."""
    if ":" in name:
        return load_spec(name)
    if name in _classes:
        return _classes[name]
    eps = _discover()
    if name not in eps:
        raise PluginError(f"unknown plugin '{name}'{did_you_mean(name, list_plugins())}; "
                          f"installed: {', '.join(list_plugins())}")
    try:
        cls = eps[name].load()
    except Exception as exc:  # a broken third-party plugin must not stop the others
        raise PluginError(f"plugin '{name}' ({eps[name].value}, from {_dist(eps[name])}) "
                          f"failed to import: {type(exc).__name__}: {exc}") from exc
    validate(cls, name)
    if cls.name != name:
        raise PluginError(f"entry point '{name}' loads a plugin named '{cls.name}'; the names must agree")
    _classes[name] = cls
    return cls


def create_plugin(name: str, **kwargs: Any) -> Plugin:
    """An instance of plugin `name` built with `kwargs`."""
    return get_plugin_class(name)(**kwargs)


def create_plugins(names: Iterable[str | Plugin]) -> list[Plugin]:
    """An instance of each named plugin (an instance passes through): what SearchSpace.from_graph takes."""
    return [create_plugin(n) if isinstance(n, str) else n for n in names]


def plugins_for(structure: Structure) -> dict[str, Plugin]:
    """An instance of each plugin a structure places, by name: what Structure.apply / resolve take."""
    return {name: create_plugin(name) for name in dict.fromkeys(p.plugin for p in structure.placements)}


def load_all(pattern: str = "*") -> dict[str, type[Plugin]]:
    """Every plugin matching `pattern` that imports; a failing one is logged in one line and skipped."""
    loaded = {}
    for name in list_plugins(pattern):
        try:
            loaded[name] = get_plugin_class(name)
        except PluginError as exc:
            log.warning("skipping plugin: %s", exc)
    return loaded
