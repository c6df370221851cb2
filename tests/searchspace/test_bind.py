"""The one bind path: placements bound to a model's sites (`bind`), attached (`attach`), counted
(`count_bound`), for structures, trials, the search space and S3PET's supernet alike."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from petlsearch.errors import StructureError
from petlsearch.plugins import create_plugin
from petlsearch.searchspace.space import SearchSpace
from petlsearch.searchspace.bound import Bound, attach, bind, count_bound
from petlsearch.searchspace.structure import Placement
from petlsearch.testing import frozen_tiny, trainable_numel


def _placement(site_key: str, plugin: str, **config: object) -> Placement:
    return Placement(site_key, plugin, dict(config))


def test_bind_fills_defaults_and_counts_exactly() -> None:
    model, graph = frozen_tiny("bert")
    lora = create_plugin("lora")
    q = next(s for s in lora.sites(graph) if s.role == "attn.q")
    [(placement, bound)] = bind([_placement(q.key, "lora", rank=2)], graph, {"lora": lora})
    assert bound == Bound(lora, q, lora.config(q, {"rank": 2})) and bound.config["alpha"] == lora.config(q)["alpha"]
    applied = attach(model, [(placement, bound)])
    assert count_bound([bound]) == applied.trainable_count() == trainable_numel(model) == 2 * (q.in_features + q.out_features)


def test_bind_names_the_placement_and_the_nearest_site() -> None:
    _, graph = frozen_tiny("bert")
    lora = create_plugin("lora")
    q = next(s for s in lora.sites(graph) if s.role == "attn.q")
    with pytest.raises(StructureError, match=r"no site '.*x'.*did you mean"):
        bind([_placement(q.key + "x", "lora")], graph, {"lora": lora})
    with pytest.raises(StructureError, match=rf"placement {q.key}@lora:.*unknown option"):
        bind([_placement(q.key, "lora", size=3)], graph, {"lora": lora})
    with pytest.raises(StructureError, match=r"no plugin instance for \['bitfit'\]"):
        bind([_placement(q.key, "bitfit")], graph, {"lora": lora})


def test_a_search_space_binds_only_its_candidates() -> None:
    _, graph = frozen_tiny("bert")
    lora = create_plugin("lora")
    v = next(s for s in lora.sites(graph) if s.role == "attn.v")
    space = SearchSpace.from_graph(graph, [lora], roles=("attn.q",))
    with pytest.raises(StructureError, match="no site"):  # a site of the model, not of the space
        space.bound([_placement(v.key, "lora")])
    q = space.candidates[0]
    assert space.bound([q.placement({})]) == [Bound(lora, q.site, lora.config(q.site))]


def test_a_key_seen_again_is_a_second_module_beside_the_first() -> None:
    """S3PET's supernet holds two sizes of a candidate: the second installs under its own name."""
    model, graph = frozen_tiny("bert")
    lora = create_plugin("lora")
    q = next(s for s in lora.sites(graph) if s.role == "attn.q")
    placements = [_placement(q.key, "lora", rank=1), _placement(q.key, "lora", rank=2)]
    applied = attach(model, bind(placements, graph, {"lora": lora}))
    assert {"petl_lora", "petl_lora_size1"} <= {n for n, _ in model.get_submodule(q.path).named_children()}
    assert applied.trainable_count() == 3 * (q.in_features + q.out_features)


def test_shared_parts_are_per_model_for_every_module_attached() -> None:
    """Compacter's slow weights are shared by the placements of one model, never across models,
    also for a second module at a site (the supernet's path once skipped the model's scope)."""
    compacter = create_plugin("compacter")
    (m1, g1), (m2, _) = frozen_tiny("bert"), frozen_tiny("bert")
    sites = compacter.sites(g1)[:2]
    placements = [_placement(sites[0].key, "compacter"), _placement(sites[0].key, "compacter"),
                  _placement(sites[1].key, "compacter")]
    a1 = attach(m1, bind(placements, g1, {"compacter": compacter}))
    a2 = attach(m2, bind(placements, g1, {"compacter": compacter}))
    slow1 = {id(m.shared_slow) for _, m in a1.modules}
    slow2 = {id(m.shared_slow) for _, m in a2.modules}
    assert len(slow1) == len(slow2) == 1 and slow1.isdisjoint(slow2)


def test_nothing_stays_attached_when_one_placement_fails() -> None:
    model, graph = frozen_tiny("bert")
    lora = create_plugin("lora")
    q = next(s for s in lora.sites(graph) if s.role == "attn.q")
    before = {n for n, _ in model.named_modules()}
    good = bind([_placement(q.key, "lora")], graph, {"lora": lora})
    bad = (good[0][0], Bound(lora, replace(q, path="no.such.module"), good[0][1].config))
    with pytest.raises(AttributeError, match="has no attribute"):
        attach(model, [*good, bad])
    assert {n for n, _ in model.named_modules()} == before
    x = torch.ones(1, 4, dtype=torch.long)
    model(input_ids=x)  # still runs as the bare model

