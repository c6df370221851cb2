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
    report = check_plugin(create_plugin("ln_tuning"))
    assert report.families == ["bert", "gpt2", "t5", "llama", "vit", "clip"]
    assert report.skipped == [] and len(report.passed) == len(report.families) * 14


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


def test_the_example_plugins_searchable_dim_sizes_it_exactly() -> None:
    """The README's plugin example declares one searchable dim (groups); each value's count is exact."""
    import torch

    from tests.helpers import frozen_tiny

    if "ln_tuning" not in list_plugins():
        pytest.skip("the example package petlsearch-ln-tuning is not installed")
    plugin = create_plugin("ln_tuning")
    model, graph = frozen_tiny("bert")
    site = plugin.sites(graph)[0]
    dim = plugin.dims(site)["groups"]
    assert dim.default == site.get("size") and len(dim.choices) == 3
    for groups in dim.choices:
        module = plugin.build(site, {"groups": groups})
        assert plugin.count(site, {"groups": groups}) == module.trainable_count() == groups
        with torch.no_grad():
            module.delta.copy_(torch.arange(groups, dtype=torch.float32))
        assert module.delta_weight().shape == (site.get("size"),)
