"""The trial-parameter encoding: groupings, budget repair or rejection, and thousands of random decodes."""

from __future__ import annotations

import math
import random

import pytest

from petlsearch.errors import PetlsearchError
from petlsearch.plugins import _tiny, create_plugins
from petlsearch.searchspace.budget import Budget
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.space import SearchSpace
from petlsearch.strategies.encoding import NONE, Encoding

PLUGINS = ["lora", "adapter", "parallel_adapter", "bitfit", "ia3"]


class RandomTrial:
    """The optuna.Trial suggest_* surface, drawing uniformly (log-uniformly where asked)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def suggest_categorical(self, name, choices):
        return self.rng.choice(choices)

    def suggest_int(self, name, low, high, log=False):
        if log:
            return min(high, max(low, round(math.exp(self.rng.uniform(math.log(low), math.log(high))))))
        return self.rng.randint(low, high)

    def suggest_float(self, name, low, high, log=False):
        return self.rng.uniform(low, high)


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_graph(ModelGraph.from_model(_tiny.bert(layers=4)), create_plugins(PLUGINS))


@pytest.mark.parametrize("group_by", ["candidate", "role", "place"])
def test_random_decodes_never_exceed_the_budget(space, group_by):
    rng = random.Random(group_by)
    for spec in ("300", "2k", "0.1%"):
        budget = Budget.parse(spec)
        enc = Encoding(space, budget, group_by=group_by)
        limit = space.bind(budget).limit
        decoded = 0
        for _ in range(350):
            placements = enc.decode(enc.suggest(RandomTrial(rng)))
            if placements is not None:
                decoded += 1
                assert placements and space.count(placements) <= limit
        assert decoded > 300  # repair keeps almost every proposal


def test_memory_budget_is_repaired_too(space):
    shape = BatchShape(8, 16)
    empty = space.memory([], shape)
    budget = Budget.parse("20k", memory=f"{int(empty * 1.02)}B")
    enc = Encoding(space, budget, shape)
    rng = random.Random(1)
    for _ in range(20):  # the memory estimate is slower than a parameter count
        placements = enc.decode(enc.suggest(RandomTrial(rng)))
        assert placements is None or space.fits(placements, budget, shape)


def test_groupings(space):
    cand = Encoding(space, Budget.parse("2k"), group_by="candidate")
    assert len(cand.groups) == len(space) and all(len(g.members) == 1 for g in cand.groups)
    role = Encoding(space, Budget.parse("2k"), group_by="role", buckets=2)
    lora_q = [g for g in role.groups if g.key.startswith("lora@") and ".attn.q@" in g.key]
    assert [g.key.rsplit("@", 1)[1] for g in lora_q] == ["L0-1", "L2-3"]
    assert all(len(g.members["lora"]) == 2 for g in lora_q)
    place = Encoding(space, Budget.parse("2k"), group_by="place", buckets=1)
    q = next(g for g in place.groups if g.key.endswith(".attn.q@L0-3"))
    assert set(q.members) == {"lora", "bitfit"}  # one method per place, chosen among the plugins
    assert Encoding(space, Budget.parse("2k")).group_by == "role"  # auto: the space is large
    with pytest.raises(PetlsearchError, match="did you mean 'role'"):
        Encoding(space, Budget.parse("2k"), group_by="rol")


def test_a_group_shares_one_config(space):
    enc = Encoding(space, Budget.parse("1M"), group_by="role", buckets=1)
    group = next(g for g in enc.groups if g.key.startswith("lora@") and ".attn.v@" in g.key)
    params = {g.method_param: NONE for g in enc.groups}
    params.update({group.method_param: "lora", group.dim_param("lora", "rank"): 3,
                   group.dim_param("lora", "alpha"): 6, group.dim_param("lora", "dropout"): 0.1})
    placements = enc.decode(params)
    assert len(placements) == 4 and {p.layer for p in placements} == {0, 1, 2, 3}
    assert all(p.config == {"rank": 3, "alpha": 6, "dropout": 0.1} for p in placements)


def test_repair_shrinks_before_it_drops(space):
    enc = Encoding(space, Budget.parse("600"), group_by="candidate")
    group = next(g for g in enc.groups if "L0.attn.q" in g.key and "lora" in g.members)
    params = {g.method_param: NONE for g in enc.groups}
    params.update({group.method_param: "lora", group.dim_param("lora", "rank"): 32,
                   group.dim_param("lora", "alpha"): 64, group.dim_param("lora", "dropout"): 0.0})
    assert space.count(enc.raw(params)) > 600
    (placement,) = enc.decode(params)
    assert placement.plugin == "lora" and 1 <= placement.config["rank"] < 32
    assert placement.config["alpha"] == 64  # alpha does not size the module, so it is kept
    assert space.count([placement]) <= 600


def test_reject_mode_and_empty_structures(space):
    enc = Encoding(space, Budget.parse("100"), group_by="candidate", infeasible="reject")
    big = next(g for g in enc.groups if "lora" in g.members)
    params = {g.method_param: NONE for g in enc.groups}
    assert enc.decode(params) is None and enc.rejections["empty"] == 1
    params.update({big.method_param: "lora", big.dim_param("lora", "rank"): 8,
                   big.dim_param("lora", "alpha"): 8, big.dim_param("lora", "dropout"): 0.0})
    assert enc.decode(params) is None and enc.rejections["over budget"] == 1


def test_real_optuna_trials_and_signature(space):
    optuna = pytest.importorskip("optuna")
    enc = Encoding(space, Budget.parse("2k"))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        params = enc.suggest(trial)
        assert params == trial.params  # every asked parameter is recorded by optuna
        placements = enc.decode(params)
        study.tell(trial, 0.0 if placements is None else float(space.count(placements)))
    other = SearchSpace.from_graph(ModelGraph.from_model(_tiny.bert(layers=4)), create_plugins(["lora"]))
    assert enc.signature() == Encoding(space, Budget.parse("9k")).signature()
    assert enc.signature() != Encoding(other, Budget.parse("2k")).signature()
