"""Every registered plugin passes the conformance kit on every tiny family where it has sites; a check
that does not apply to a plugin on any family is reported as skipped, with its reason."""

from __future__ import annotations

import pytest

from petlsearch.plugins import create_plugin, list_plugins
from petlsearch.plugins.testing import CHECKS, applicable_families, run_check

# Checks a plugin is known to fail, with the reason: {plugin: {check or check:family: reason}}.
EXPECTED_FAILURES: dict[str, dict[str, str]] = {}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", list_plugins())
def test_conformance(name: str, check: str) -> None:
    plugin = create_plugin(name)
    skip = EXPECTED_FAILURES.get(name, {})
    if check in skip:
        pytest.skip(skip[check])
    families = applicable_families(plugin)
    reasons = [skip.get(f"{check}:{family}") or run_check(plugin, check, family) for family in families]
    if all(reasons):
        pytest.skip(reasons[0])
