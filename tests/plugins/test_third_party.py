"""The example third-party package (examples/petlsearch-ln-tuning) is discovered through its entry
point and passes the conformance kit, exactly as a built-in plugin."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from petlsearch.plugins import create_plugin, list_plugins, register
from petlsearch.plugins.testing import check_plugin


def test_example_package_is_discovered_and_conforms() -> None:
    eps = {ep.name: ep for ep in entry_points(group="petlsearch.plugins")}
    if "ln_tuning" not in eps:
        pytest.fail("examples/petlsearch-ln-tuning is not installed: `make install` installs it")
    assert eps["ln_tuning"].dist.name == "petlsearch-ln-tuning"
    assert "ln_tuning" in list_plugins("ln_*")
    assert check_plugin(create_plugin("ln_tuning")) == ["bert", "gpt2", "t5", "llama", "vit", "clip"]


def test_registration_checks_name_and_methods() -> None:
    from petlsearch.errors import PluginError
    from petlsearch.plugins.base import Plugin

    class NoCount(Plugin):
        name, kinds = "no_count", ("weight",)

        def sites(self, graph): return []
        def dims(self, site): return {}
        def build(self, site, cfg): return None

    with pytest.raises(PluginError, match="'no_count': must define count"):
        register(NoCount)

    class BadKind(NoCount):
        name, kinds = "bad_kind", ("everywhere",)

    with pytest.raises(PluginError, match="bad_kind.*kinds"):
        register(BadKind)

    class BadSignature(NoCount):
        name = "bad_sig"

        def count(self, site): return 0

    with pytest.raises(PluginError, match="count\\(\\) must take 2 argument"):
        register(BadSignature)


def test_duplicate_names_are_an_error_naming_both() -> None:
    from petlsearch.errors import PluginError
    from petlsearch.plugins.lora import LoRA

    class Impostor(LoRA):
        pass

    with pytest.raises(PluginError, match="two plugins are named 'lora'"):
        register(Impostor)


def test_unknown_plugin_suggests() -> None:
    from petlsearch.errors import PluginError

    with pytest.raises(PluginError, match="did you mean 'lora'"):
        create_plugin("loar")
