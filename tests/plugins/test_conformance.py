"""Every registered plugin passes the conformance kit on every tiny family where it has sites."""

from __future__ import annotations

import pytest

from petlsearch.plugins import create_plugin, list_plugins
from petlsearch.plugins.testing import CHECKS, applicable_families

# Checks a plugin is known to fail, with the reason: {plugin: {check or check:family: reason}}.
EXPECTED_FAILURES: dict[str, dict[str, str]] = {}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", list_plugins())
def test_conformance(name: str, check: str) -> None:
    plugin = create_plugin(name)
    skip = EXPECTED_FAILURES.get(name, {})
    if check in skip:
        pytest.skip(skip[check])
    for family in applicable_families(plugin):
        if f"{check}:{family}" not in skip:
            CHECKS[check](plugin, family)
