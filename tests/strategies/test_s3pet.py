"""S3PET on real data (Rotten Tomatoes on a tiny BERT): the supernet, the bi-level search, the pipeline."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from petlsearch.errors import PetlsearchError
from petlsearch.plugins import create_plugins
from petlsearch.runners.search import search
from petlsearch.runners.trainer import TrainConfig
from petlsearch.runners.trial import TRAINING, run_trial
from petlsearch.searchspace.budget import Budget
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.space import SearchSpace
from petlsearch.strategies.arms import MIN_HELD, SPACE_RATIO, auto_scale, expand_arms
from petlsearch.strategies.base import SearchContext, SearchResult, get_strategy
from petlsearch.strategies.s3pet import S3PETSearch
from petlsearch.strategies.supernet import build_supernet, split_train

FAST = TrainConfig(steps=3, batch_size=16, eval_every=0, max_eval_examples=32)
PLUGINS = ("lora", "adapter", "parallel_adapter", "bitfit", "ia3")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is far faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_ctx(task, budget: str = "600", out=None, timeout=None, calls=None, memory=None) -> SearchContext:
    graph = ModelGraph.from_model(task.make_model())
    space = SearchSpace.from_graph(graph, create_plugins(PLUGINS))

    def objective(placements, report, train=None):
        if calls is not None:
            calls.append(placements)
        return run_trial(task, placements, space.plugins, FAST, report=report)

    return SearchContext(space, Budget.parse(budget, memory), task, FAST, 1, 0, out, timeout,
                         shape=BatchShape(FAST.batch_size, task.max_length), objective=objective, training=TRAINING)


def test_options_are_stored_unchanged_and_checked():
    s = get_strategy("s3pet", steps=7, arch_lr=0.05, beta=(2.0, 0.5), gate="straight_through", sizes=2,
                     second_order=True, arch_every=3)
    assert isinstance(s, S3PETSearch)
    assert (s.steps, s.arch_lr, s.beta, s.gate, s.sizes, s.second_order, s.arch_every) == (
        7, 0.05, (2.0, 0.5), "straight_through", 2, True, 3)
    with pytest.raises(PetlsearchError, match="gate"):
        S3PETSearch(gate="bernoulli").run(SearchContext(None, Budget.parse("1k"), object(), FAST))
    with pytest.raises(PetlsearchError, match="beta"):
        S3PETSearch(beta=(1.0, 0.0)).run(SearchContext(None, Budget.parse("1k"), object(), FAST))


def test_holdout_comes_from_the_training_split(tiny_task):
    weights, alphas = split_train(tiny_task, 0.5, seed=0)
    x, _ = tiny_task.splits.split("train")
    a, b = weights.splits.x_train, alphas.splits.x_train
    assert len(a) + len(b) == len(x) and abs(len(a) - len(b)) <= 1
    assert sorted(a + b) == sorted(x)
    assert weights.splits.x_val == tiny_task.splits.x_val == alphas.splits.x_val


def test_supernet_with_gates_at_zero_is_the_bare_model(tiny_task):
    ctx = make_ctx(tiny_task, budget="50%")
    net = build_supernet(ctx, tiny_task, FAST, sizes=2, device=torch.device("cpu"), gate="hard_concrete",
                         stretch=(-0.1, 1.1), implicit=True)
    assert len(net.arms) > len(ctx.space.candidates)  # two sizes of most candidates live side by side
    with torch.no_grad():  # make every module change the output when open
        for p in net.weights():
            p.add_(0.05 * torch.randn_like(p))
    bare = tiny_task.make_model().eval()
    batch = next(tiny_task.batches("val", 8))
    net.model.eval()
    net.fixed = [1.0] * len(net.arms)
    assert not torch.allclose(net.model(**batch).logits, bare(**batch).logits)
    net.fixed = [0.0] * len(net.arms)
    torch.testing.assert_close(net.model(**batch).logits, bare(**batch).logits, rtol=0, atol=0)
    net.close()  # tensor gates (as during an alpha step) at 0 remove every module too
    for arm in net.arms:
        arm.module.gate = torch.zeros((), requires_grad=True)
    torch.testing.assert_close(net.model(**batch).logits, bare(**batch).logits, rtol=0, atol=0)


def test_short_search_end_to_end(tiny_task):
    ctx = make_ctx(tiny_task, budget="600")
    result = S3PETSearch(steps=6, arch_lr=0.2, warmup=0).run(ctx)
    assert isinstance(result, SearchResult) and result.strategy == "s3pet"
    assert result.best and ctx.space.count(result.best) <= 600
    assert [r.status for r in result.history] == ["complete"] and result.best_record is not None
    ex = result.extras
    first, last = ex["alphas"][0], ex["alphas"][-1]
    assert (first["step"], last["step"]) == (0, 6) and last["beta"] == pytest.approx(0.1)
    assert first["alpha"] != last["alpha"]  # the held-out loss moved the structure parameters
    assert all(p["budget_use"] == pytest.approx(1.0, rel=1e-5) for p in ex["curve"])
    assert all(p["loss"] is not None and p["arch_loss"] is not None for p in ex["curve"])
    expected = sum(c["cost"] * ex["probabilities"][c["name"]] for c in ex["candidates"])
    assert expected == pytest.approx(600, rel=1e-4)
    assert len(ex["chosen"]) == len(result.best) and set(ex["gates"]) == set(ex["probabilities"])
    json.dumps(ex)  # the report can hold it


def test_warmup_tightens_a_large_space_to_the_budget(tiny_task):
    """A space of more than SPACE_RATIO budgets starts meeting space / SPACE_RATIO (every gate well
    open), tightens geometrically and meets the budget itself from `warmup` of the steps on; the
    structure still fits the budget."""
    ctx = make_ctx(tiny_task, budget="100")
    net = build_supernet(ctx, tiny_task, FAST, "auto", torch.device("cpu"), "hard_concrete", (-0.1, 1.1), True)
    start = float(net.constraints[0].costs.sum()) / (SPACE_RATIO * 100)
    assert net.constraints[0].start == pytest.approx(start) and start > 1.5
    net.close()
    result = S3PETSearch(steps=8, warmup=0.5).run(ctx)
    use = {p["step"]: p["budget_use"] for p in result.extras["curve"]}
    assert use[2] == pytest.approx(start ** 0.5, rel=1e-4)  # step 2 of a 4-step warm-up: half way, geometrically
    assert use[1] > use[2] > use[3] > 1.0
    assert all(use[s] == pytest.approx(1.0, rel=1e-5) for s in range(4, 9))
    assert ctx.space.count(result.best) <= 100
    with pytest.raises(PetlsearchError, match="warmup"):
        S3PETSearch(warmup=1.5)._check(ctx)


def test_parameter_and_memory_budgets_together(tiny_task):
    """Each budget has its own shift; the larger one binds and the other is met with room to spare."""
    from petlsearch.searchspace.memory import marginal_cost

    probe = make_ctx(tiny_task, budget="2k")
    base = probe.space.memory([], probe.shape)
    arms = expand_arms(probe.space, probe.budget, probe.shape, 1)
    resolved = [(probe.space.plugins[a.placement.plugin], a.candidate.site, a.placement.config) for a in arms]
    marginal = [marginal_cost(probe.space.graph, p, s, c, probe.shape) for p, s, c in resolved]
    ctx = make_ctx(tiny_task, budget="2k", memory=f"{base + 4 * max(marginal)}B")
    net = build_supernet(ctx, tiny_task, FAST, 1, torch.device("cpu"), "expected", (-0.1, 1.1), True)
    assert [c.unit for c in net.constraints] == ["params", "memory"]
    assert net.constraints[1].costs.tolist() == marginal
    p = torch.tensor(net.probabilities(), dtype=torch.float64)
    uses = [float(c.costs @ p) / c.budget for c in net.constraints]
    assert max(uses) == pytest.approx(1.0, rel=1e-6) and min(uses) <= 1.0
    net.close()
    result = S3PETSearch(steps=2, gate="expected").run(ctx)
    ctx.check_fits(result.best)
    assert ctx.space.memory(result.best, ctx.shape) <= ctx.budget.memory


def test_second_order_sizes_and_straight_through(tiny_task):
    ctx = make_ctx(tiny_task, budget="700")
    result = S3PETSearch(steps=2, sizes=2, second_order=True, gate="straight_through", beta=0.5,
                         arch_every=1).run(ctx)
    assert ctx.space.count(result.best) <= 700
    assert len({p.key for p in result.best}) == len(result.best)
    assert result.extras["alphas"][0]["alpha"] != result.extras["alphas"][-1]["alpha"]
    assert any("[" in c["name"] for c in result.extras["candidates"])


def test_timeout_discretises_what_it_has_and_resume_reuses_the_trial(tiny_task, tmp_path):
    calls: list = []
    ctx = make_ctx(tiny_task, out=tmp_path, timeout=0.0, calls=calls)
    first = S3PETSearch(steps=50).run(ctx)
    assert first.extras["stopped_early"] and first.extras["steps"] == 1
    again = S3PETSearch(steps=50).run(replace(ctx, _journal=None))
    assert len(calls) == 1  # the identical structure was not trained twice
    assert again.best == first.best and again.history[0].score == first.history[0].score


def test_pipeline_writes_the_run_with_s3pet_extras(tiny_task, tmp_path, monkeypatch):
    import petlsearch.runners.search as S

    for name in ("structure_heatmap", "search_curve", "pareto_plot"):  # matplotlib is slow and not S3PET's
        monkeypatch.setattr(S.pictures, name, lambda *a, **k: None)
    out = tmp_path / "run"
    result = search(task=tiny_task, budget="1k", strategy="s3pet", plugins=PLUGINS, out=out, fidelity=FAST,
                    final=FAST, strategy_options={"steps": 3})
    assert result.structure.result["trainable_params"] <= 1000
    assert result.structure.result["strategy"] == "s3pet" and "accuracy" in result.final.test
    report = json.loads((out / "report.json").read_text())
    assert {"alphas", "curve", "gates", "probabilities", "chosen"} <= set(report["extras"])
    assert (out / "structure.yaml").exists()


def test_auto_sizes_scale_the_space_to_a_few_budgets(tiny_task):
    """sizes="auto": every candidate at one size, its default times the largest scale at which the
    whole space costs at most SPACE_RATIO budgets; a small budget gets the smallest sizes, a budget
    above the whole space at its defaults gets larger ones."""
    space = make_ctx(tiny_task).space
    default_total = sum(space.plugins[c.plugin].count(c.site, space.plugins[c.plugin].config(c.site))
                        for c in space.candidates)

    def arms(params: int) -> list:
        budget = Budget(params=params)
        out = expand_arms(space, budget, BatchShape(16, 32), "auto")
        assert len({a.placement.key for a in out}) == len(out)  # one size per candidate
        return out

    at_default = arms(default_total // SPACE_RATIO)
    assert auto_scale(space, Budget(params=default_total // SPACE_RATIO)) == 1.0
    assert {a.placement.config["rank"] for a in at_default if a.placement.plugin == "lora"} == {8}
    small = arms(default_total // 100)
    assert {a.placement.config["rank"] for a in small if a.placement.plugin == "lora"} == {1}
    large = Budget(params=default_total)
    assert auto_scale(space, large) > 1.0
    total = sum(a.cost for a in expand_arms(space, large, BatchShape(16, 32), "auto"))
    assert default_total < total <= SPACE_RATIO * default_total
    with pytest.raises(PetlsearchError, match="sizes"):
        S3PETSearch(sizes="many")._check(make_ctx(tiny_task))


def test_auto_sizes_leave_out_an_arm_that_fills_most_of_the_budget(tiny_task):
    """Under "auto" every arm costs at most 1 / MIN_HELD of the budget, so the search chooses
    among parts; when no arm is that cheap, every arm that fits stays."""
    space = make_ctx(tiny_task).space
    shape = BatchShape(16, 32)
    every = expand_arms(space, Budget(params=10_000), shape, 1)
    cheapest = min(a.cost for a in every)
    limit = int(3 * cheapest)
    arms = expand_arms(space, Budget(params=limit), shape, "auto")
    assert arms and all(a.cost <= limit / MIN_HELD for a in arms)
    assert any(a.cost > limit / MIN_HELD for a in expand_arms(space, Budget(params=limit), shape, 1))
    tight = int(1.5 * cheapest)  # no arm is half of it: the arms that fit stay
    assert {a.cost <= tight for a in expand_arms(space, Budget(params=tight), shape, "auto")} == {True}
    assert any(a.cost > tight / MIN_HELD for a in expand_arms(space, Budget(params=tight), shape, "auto"))
