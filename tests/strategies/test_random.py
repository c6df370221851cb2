"""The random baseline through the whole pipeline on real data: budgets, resume, failed trials."""

from __future__ import annotations

import json

import pytest

from petlsearch.errors import PetlsearchError
from petlsearch.runners.search import search
from petlsearch.runners.trainer import TrainConfig

FAST = TrainConfig(steps=3, batch_size=16, eval_every=0, max_eval_examples=32)


def test_search_writes_a_run_folder_under_budget(tiny_task, tmp_path) -> None:
    out = tmp_path / "run"
    result = search(task=tiny_task, budget="2%", strategy="random", trials=3, out=out, fidelity=FAST, final=FAST)
    res = result.structure.result
    assert res["trainable_params"] <= 0.02 * res["backbone_params"]
    assert {p.name for p in out.iterdir()} >= {"structure.yaml", "report.json", "weights.safetensors",
                                               "head.safetensors", "trials.jsonl", "structure.png",
                                               "search_curve.png", "pareto.png", "run.json"}
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    report = json.loads((out / "report.json").read_text())
    assert len(report["history"]) == 3 and report["pareto"]


def test_existing_folder_needs_resume_and_resume_reruns_nothing(tiny_task, tmp_path) -> None:
    out = tmp_path / "run"
    search(task=tiny_task, budget="2%", strategy="random", trials=2, out=out, fidelity=FAST, final=FAST)
    with pytest.raises(PetlsearchError, match="--resume"):
        search(task=tiny_task, budget="2%", strategy="random", trials=2, out=out, fidelity=FAST, final=FAST)
    with pytest.raises(PetlsearchError, match="arguments differ"):
        search(task=tiny_task, budget="3%", strategy="random", trials=2, out=out, fidelity=FAST, final=FAST,
               resume=True)
    before = (out / "trials.jsonl").read_text().count("\n")
    result = search(task=tiny_task, budget="2%", strategy="random", trials=4, out=out, fidelity=FAST, final=FAST,
                    resume=True)
    lines = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert sorted({r["number"] for r in lines}) == [0, 1, 2, 3]
    # trials 0 and 1 were not run again: each has one 'running' and one final record only
    assert sum(1 for r in lines if r["number"] in (0, 1)) == before
    assert len(result.search.history) == 4


def test_failed_trials_are_recorded_and_the_search_goes_on(tiny_task, tmp_path, monkeypatch) -> None:
    import petlsearch.runners.search as S

    calls = {"n": 0}
    real = S.run_trial

    def flaky(task, placements, plugins, cfg, report=None, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        if calls["n"] == 2:
            out = real(task, placements, plugins, cfg, report=report, **kw)
            out.score = float("nan")
            return out
        return real(task, placements, plugins, cfg, report=report, **kw)

    monkeypatch.setattr(S, "run_trial", flaky)
    result = search(task=tiny_task, budget="2%", strategy="random", trials=3, out=tmp_path / "r", fidelity=FAST,
                    final=FAST)
    statuses = [r.status for r in result.search.history]
    assert statuses == ["failed", "failed", "complete"]
    assert "boom" in result.search.history[0].error and "nan" in result.search.history[1].error


def test_budget_too_small_for_any_candidate(tiny_task) -> None:
    from petlsearch.errors import BudgetError

    with pytest.raises(BudgetError, match="too small"):
        search(task=tiny_task, budget="5", trials=1, fidelity=FAST, final=FAST)


def test_resume_from_a_stale_journal_is_a_clear_error(tiny_task, tmp_path) -> None:
    out = tmp_path / "run"
    search(task=tiny_task, budget="2%", strategy="random", trials=1, out=out, fidelity=FAST, final=FAST)
    journal = out / "trials.jsonl"
    journal.write_text(journal.read_text().replace("encoder.L", "vision.L"))  # sites of another model
    with pytest.raises(PetlsearchError, match="cannot resume.*does not have"):
        search(task=tiny_task, budget="2%", strategy="random", trials=2, out=out, fidelity=FAST, final=FAST,
               resume=True)


@pytest.mark.parametrize("strategy", ["random", "s3pet"])
def test_include_head_makes_the_head_pay_first(tiny_task, strategy: str) -> None:
    """--include-head changes what a search returns: the tiny BERT's head (66 parameters) comes out of
    the budget before any module, so 100 parameters hold one rank-1 LoRA (64) without it and none with
    it, and at 200 every structure leaves room for the head."""
    from petlsearch.errors import BudgetError

    kwargs = dict(task=tiny_task, strategy=strategy, plugins=["lora"], trials=2, fidelity=FAST, final=FAST)
    without = search(budget="100", **kwargs).structure.result
    assert 0 < without["trainable_params"] <= 100 and without["head_params"] == 66
    with pytest.raises(BudgetError, match="34 left beside the head"):
        search(budget="100", include_head=True, **kwargs)
    result = search(budget="200", include_head=True, **kwargs)
    assert 0 < result.structure.result["trainable_params"] <= 200 - 66
    assert all(r.params + 66 <= 200 for r in result.search.history)
