"""check_plugin: the conformance kit every plugin passes, built-in or third-party.

Each property is a separate `check_<property>(plugin, family)` with a one-line docstring; a
failure says which plugin, family and site, and what to change, and so does an exception raised
inside a check (wrapped, with its last line). A check that does not apply to the plugin (merging a
plugin that is not mergeable, identity at init for one that declares it is not) raises
`CheckSkipped` with the reason, and is reported as skipped, never as passed (as scikit-learn's
estimator checks do). Known failures are declared as `{check_name: reason}` and skipped. Run it
from a test::

    from petlsearch.plugins.testing import check_plugin
    def test_my_plugin():
        check_plugin(MyPlugin())

or subclass `PluginConformance` and provide a `plugin` fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.checks import CHECKS, FAMILIES, CheckSkipped, ConformanceError, check_recipe
from petlsearch.searchspace.graph import ModelGraph

__all__ = ["CHECKS", "FAMILIES", "CheckSkipped", "ConformanceError", "KitReport", "PluginConformance",
           "applicable_families", "check_plugin", "check_recipe", "run_check"]


@dataclass
class KitReport:
    """What `check_plugin` ran: the families with sites, and (check, family, reason) of each skip."""

    families: list[str]
    passed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


def run_check(plugin: Plugin, name: str, family: str) -> str | None:
    """Run one check on one family: None when it passed, the reason when it does not apply
    (CheckSkipped). A failure raises ConformanceError naming the check, the family and the fix; an
    exception from inside the plugin is wrapped into one, with its last line."""
    try:
        CHECKS[name](plugin, family)
    except CheckSkipped as skip:
        return str(skip)
    except ConformanceError:
        raise
    except Exception as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        hint = ("an update must have the shape of the parameter it changes (GPT-2's Conv1D stores its weight "
                "as (in, out), a Linear as (out, in): read the site's in_features / out_features)"
                if "shape" in last or "size" in last else "see the chained exception for where it was raised")
        raise ConformanceError(f"[{plugin.name}] {name} on {family}: raised {type(exc).__name__}: {last}; {hint}") from exc
    return None


def applicable_families(plugin: Plugin, families: tuple[str, ...] = FAMILIES) -> list[str]:
    """Families of the tiny model zoo on which the plugin has at least one site."""
    out = []
    for family in families:
        with torch.device("meta"):
            model = tiny.FAMILIES[family]()
        if plugin.sites(ModelGraph.from_model(model)):
            out.append(family)
    return out


def check_plugin(plugin: Plugin, families: tuple[str, ...] = FAMILIES,
                 expected_failures: dict[str, str] | None = None) -> KitReport:
    """Run every check on every family where the plugin has sites; a failure raises ConformanceError.

    `expected_failures` maps a check name (or 'check_name:family') to the reason it is skipped. The
    report lists what passed and what was skipped, with the reasons.
    """
    skip = expected_failures or {}
    checked = applicable_families(plugin, families)
    if not checked:
        raise ConformanceError(f"[{plugin.name}] has no site on any of {families}")
    report = KitReport(checked)
    for family in checked:
        for name in CHECKS:
            reason = skip.get(name, skip.get(f"{name}:{family}"))
            if reason is None:
                reason = run_check(plugin, name, family)
            if reason is None:
                report.passed.append((name, family))
            else:
                report.skipped.append((name, family, reason))
    return report


class PluginConformance:
    """pytest base class: subclass it and provide a `plugin` fixture to run each check as a test
    (`test_<property>` for every `check_<property>`); a check that does not apply is skipped."""

    families: tuple[str, ...] = FAMILIES
    expected_failures: dict[str, str] = {}

    def _each(self, plugin: Plugin, name: str) -> None:
        import pytest

        if name in self.expected_failures:
            pytest.skip(self.expected_failures[name])
        families = applicable_families(plugin, self.families)
        reasons = [self.expected_failures.get(f"{name}:{family}") or run_check(plugin, name, family)
                   for family in families]
        if families and all(reasons):
            pytest.skip(reasons[0])


def _test_method(name: str) -> Callable[[PluginConformance, Plugin], None]:
    def test(self: PluginConformance, plugin: Plugin) -> None:
        self._each(plugin, name)

    test.__name__ = test.__qualname__ = "test_" + name.removeprefix("check_")
    test.__doc__ = CHECKS[name].__doc__
    return test


for _name in CHECKS:
    setattr(PluginConformance, "test_" + _name.removeprefix("check_"), _test_method(_name))
