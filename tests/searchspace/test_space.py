"""Search space size, sampling under budgets (property tests), and counted == built."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from petlsearch.errors import BudgetError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins import create_plugins, plugins_for
from petlsearch.searchspace.budget import Budget
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.space import SearchSpace
from petlsearch.searchspace.structure import Structure

CORE = ["lora", "adapter", "parallel_adapter", "bitfit", "ia3"]
_SPACES: dict[str, SearchSpace] = {}


def space_of(family: str) -> SearchSpace:
    if family not in _SPACES:
        _SPACES[family] = SearchSpace.from_graph(ModelGraph.from_model(tiny.FAMILIES[family]()), create_plugins(CORE))
    return _SPACES[family]


def test_filters_and_size() -> None:
    space = space_of("bert")
    only_qv = SearchSpace.from_graph(space.graph, create_plugins(["lora"]), roles=("attn.q", "attn.v"), layers=(1,))
    assert sorted(c.site.name for c in only_qv.candidates) == ["encoder.L1.attn.q", "encoder.L1.attn.v"]
    size = space.size()
    assert size.candidates == len(space.candidates) and size.dims > 0 and size.log10_structures > 10
    costs = [c.min_cost for c in space.by_cost()]
    assert costs == sorted(costs)


@settings(max_examples=60, deadline=None)
@given(family=st.sampled_from(["bert", "gpt2", "t5", "llama", "vit"]),
       fraction=st.floats(min_value=1e-3, max_value=0.5), seed=st.integers(0, 10**6))
def test_random_structures_never_exceed_random_budgets(family: str, fraction: float, seed: int) -> None:
    space = space_of(family)
    budget = Budget(fraction=fraction)
    limit = space.bind(budget).limit
    if min(c.min_cost for c in space.candidates) > limit:
        with pytest.raises(BudgetError):
            space.sample(random.Random(seed), budget)
        return
    placements = space.sample(random.Random(seed), budget)
    assert placements and space.count(placements) <= limit


@settings(max_examples=15, deadline=None)
@given(family=st.sampled_from(["bert", "gpt2", "t5", "llama", "vit", "clip"]), seed=st.integers(0, 10**6))
def test_counted_equals_built(family: str, seed: int) -> None:
    space = space_of(family)
    placements = space.sample(random.Random(seed), Budget(fraction=0.3))
    model = tiny.FAMILIES[family]()
    for p in model.parameters():
        p.requires_grad_(False)
    applied = space.structure(placements).apply(model, space.plugins, force=True)
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert built == space.count(placements) == applied.trainable_count()
    applied.detach()
    assert not any(p.requires_grad for p in model.parameters())


def test_budget_too_small_is_a_clear_error() -> None:
    with pytest.raises(BudgetError, match="cheapest needs"):
        space_of("bert").sample(random.Random(0), Budget(params=3))


def test_structure_roundtrip_through_file(tmp_path) -> None:
    space = space_of("bert")
    placements = space.sample(random.Random(1), Budget(fraction=0.2))
    s = space.structure(placements, Budget.parse("20%"), name="tiny-bert", result={"seed": 1})
    for suffix in (".yaml", ".json"):
        loaded = Structure.load(s.save(tmp_path / f"s{suffix}"))
        assert loaded.placements == s.placements and loaded.backbone == s.backbone
        assert loaded.budget["fraction"] == pytest.approx(0.2)
    model = tiny.bert()
    applied = loaded.apply(model, plugins_for(loaded))
    for _, m in applied.modules:  # train-like change, then save / load the weights
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    x = tiny.inputs("bert")
    with torch.no_grad():
        expected = model(**x).logits
    applied.save_weights(tmp_path / "w.safetensors")
    fresh = tiny.bert()
    loaded.apply(fresh, plugins_for(loaded)).load_weights(tmp_path / "w.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, expected)
