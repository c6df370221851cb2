"""OptunaSearch: real training on the tiny task, failures, Pareto output, pruning, resume after a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from petlsearch.errors import PetlsearchError  # noqa: E402
from petlsearch.plugins import (
    _tiny,  # noqa: E402
    create_plugins,
)
from petlsearch.runners.trainer import TrainConfig  # noqa: E402
from petlsearch.searchspace.budget import Budget  # noqa: E402
from petlsearch.searchspace.graph import ModelGraph  # noqa: E402
from petlsearch.searchspace.space import SearchSpace  # noqa: E402
from petlsearch.strategies.base import SearchContext  # noqa: E402
from petlsearch.strategies.encoding import Encoding  # noqa: E402
from petlsearch.strategies.optuna import OptunaSearch  # noqa: E402

FAST = TrainConfig(steps=4, batch_size=16, eval_every=2, max_eval_examples=32)
PLUGINS = ["lora", "adapter", "bitfit"]


@dataclass
class Outcome:
    """What SearchContext.evaluate reads from a TrialOutcome."""

    score: float
    pruned: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def tiny_space() -> SearchSpace:
    return SearchSpace.from_graph(ModelGraph.from_model(_tiny.bert()), create_plugins(PLUGINS))


def quality(space: SearchSpace, placements) -> float:
    """A deterministic score that grows with the parameters (so score and params trade off)."""
    n = space.count(placements)
    return 1.0 - math.exp(-n / 800) + 0.01 * (len(placements) % 3)


def make_ctx(space, objective, tmp_path=None, n_trials=6, budget="2k", **kw) -> SearchContext:
    return SearchContext(space, Budget.parse(budget), None, FAST, n_trials=n_trials, seed=0,
                         out_dir=tmp_path, objective=objective, **kw)


def test_tpe_on_real_training(tiny_task, tmp_path):
    from petlsearch.runners.trial import run_trial

    space = SearchSpace.from_graph(ModelGraph.from_model(tiny_task.make_model()), create_plugins(["lora", "bitfit"]),
                                   roles=("attn.q", "attn.v"))

    def objective(placements, report, train=None):
        return run_trial(tiny_task, placements, space.plugins, FAST, report=report)

    ctx = make_ctx(space, objective, tmp_path, n_trials=2, budget="1500")
    result = OptunaSearch(startup_trials=2).run(ctx)
    assert len(result.history) == 2 and result.best
    assert space.count(result.best) <= 1500
    assert all(r.status in ("complete", "pruned") and r.intermediate for r in result.history)
    assert (tmp_path / "optuna.journal").exists()
    journal = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert sorted({r["number"] for r in journal if r["status"] != "running"}) == [r.number for r in result.history]
    # the run folder's study is an ordinary optuna study, readable by optuna-dashboard
    study = optuna.load_study(study_name="petlsearch", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    assert study.metric_names == ["minus validation loss"]
    for trial, record in zip(study.trials, result.history):
        assert trial.user_attrs["params"] == record.params == space.count(record.structure())
        assert trial.user_attrs["structure"].count(" @ encoder.") == len(record.placements)
        assert trial.user_attrs["val loss"] == record.metrics["loss"]


def test_failed_trials_are_recorded_and_search_goes_on(tmp_path):
    space = tiny_space()

    def objective(placements, report, train=None):
        calls.append(placements)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        if len(calls) == 3:
            return Outcome(float("nan"))
        return Outcome(quality(space, placements))

    calls: list = []
    result = OptunaSearch(pruner="none").run(make_ctx(space, objective, tmp_path, n_trials=5))
    status = [r.status for r in result.history]
    assert status.count("failed") == 2 and status.count("complete") == 3 and len(calls) == 5
    assert "out of memory" in result.history[1].error and "nan" in result.history[2].error
    study = optuna.load_study(study_name="petlsearch", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    assert [t.state.name for t in study.trials].count("FAIL") == 2


def test_multi_objective_pareto_front_is_non_dominated():
    space = tiny_space()
    ctx = make_ctx(space, lambda p, report, train=None: Outcome(quality(space, p)), n_trials=12, budget="4k")
    result = OptunaSearch(objectives=("score", "params")).run(ctx)
    front, done = result.pareto, [r for r in result.history if r.status == "complete"]
    assert front and result.extras["objectives"] == ["score", "params"]

    def dominates(a, b):
        return a.score >= b.score and a.params <= b.params and (a.score > b.score or a.params < b.params)

    assert not any(dominates(a, b) for a in front for b in front)
    assert all(any(dominates(f, r) or (f.score, f.params) == (r.score, r.params) for f in front) for r in done)
    assert [r.params for r in front] == sorted(r.params for r in front)


def test_memory_objective_uses_the_estimate():
    space = tiny_space()
    ctx = make_ctx(space, lambda p, report, train=None: Outcome(quality(space, p)), n_trials=4, budget="4k")
    result = OptunaSearch(objectives="score,memory").run(ctx)
    assert result.pareto and all(r.status == "complete" for r in result.history)


def test_pruner_stops_weak_trials():
    space = tiny_space()
    stopped_at: list[int] = []

    def objective(placements, report, train=None):
        final = quality(space, placements)
        for step in range(1, 6):  # a learning curve that ranks trials the same at every step
            if report(step, final * step / 5):
                stopped_at.append(step)
                return Outcome(final * step / 5, pruned=True)
        return Outcome(final)

    result = OptunaSearch(pruner="median", startup_trials=2).run(make_ctx(space, objective, n_trials=12))
    pruned = [r for r in result.history if r.status == "pruned"]
    assert pruned and stopped_at and all(s < 5 for s in stopped_at)
    assert all(len(r.intermediate) < 5 for r in pruned)


def test_pruner_ranks_trials_by_validation_loss_when_accuracy_ties():
    # every trial's accuracy is stuck at the majority class; only the loss tells them apart
    space = tiny_space()

    def objective(placements, report, train=None):
        loss = 1.0 - quality(space, placements)
        for step in range(1, 6):
            if report(step, 0.5, loss=loss + 1.0 / step):
                return Outcome(0.5, pruned=True)
        return Outcome(0.5)

    result = OptunaSearch(pruner="median", startup_trials=2).run(make_ctx(space, objective, n_trials=12))
    pruned = [r for r in result.history if r.status == "pruned"]
    kept = [r for r in result.history if r.status == "complete"]
    assert pruned and kept
    assert min(r.params for r in kept) > min(r.params for r in pruned)  # the lossier (smaller) ones stop


def test_rejected_structures_are_never_trained():
    # 4 candidates: LoRA on attn.q costs 64 per rank here, so most LoRA proposals exceed 300
    space = SearchSpace.from_graph(ModelGraph.from_model(_tiny.bert()), create_plugins(["lora", "bitfit"]), roles=("attn.q",))
    budget = Budget.parse("300")

    def objective(placements, report, train=None):
        assert placements and space.fits(placements, budget)
        return Outcome(quality(space, placements))

    ctx = make_ctx(space, objective, n_trials=4, budget="300")
    result = OptunaSearch(infeasible="reject", pruner="none").run(ctx)
    assert len(result.history) == 4 and result.extras["rejected"].get("over budget", 0) > 0


def test_bad_options_fail_clearly():
    space = tiny_space()
    ctx = make_ctx(space, lambda p, r, train=None: Outcome(0.5), n_trials=1)
    with pytest.raises(PetlsearchError, match="objectives"):
        OptunaSearch(objectives=("params",)).run(ctx)
    with pytest.raises(PetlsearchError, match="did you mean 'median'"):
        OptunaSearch(pruner="medain").run(ctx)


def test_resume_rejects_a_different_space(tmp_path):
    space = tiny_space()
    OptunaSearch(pruner="none").run(make_ctx(space, lambda p, r, train=None: Outcome(quality(space, p)), tmp_path, 2))
    other = SearchSpace.from_graph(ModelGraph.from_model(_tiny.bert()), create_plugins(["lora"]))
    with pytest.raises(PetlsearchError, match="cannot resume"):
        OptunaSearch(pruner="none").run(make_ctx(other, lambda p, r, train=None: Outcome(0.5), tmp_path, 4))


def test_trial_finished_before_a_crash_is_restored_without_training(tmp_path):
    """Killed between the journal line and optuna's tell: the trial counts and is not rerun."""
    space = tiny_space()
    ctx = make_ctx(space, lambda p, r, train=None: Outcome(0.42), tmp_path, n_trials=1)
    enc = Encoding(space, ctx.budget, lr_scales=ctx.lr_scales)
    study = OptunaSearch()._study(optuna, ctx, ("score",), enc)
    trial = study.ask()
    params = enc.suggest(trial)
    ctx.evaluate(trial.number, enc.decode(params), train=enc.train(params))  # journal written, optuna never told

    calls: list = []
    ctx2 = make_ctx(space, lambda p, r, train=None: calls.append(p) or Outcome(0.9), tmp_path, n_trials=3)
    result = OptunaSearch(pruner="none").run(ctx2)
    assert len(calls) == 2 and len(result.history) == 3
    assert result.history[0].number == trial.number and result.history[0].score == 0.42


KILLED = r"""
import sys, time
from dataclasses import dataclass, field
from pathlib import Path
from tests.strategies.test_optuna import Outcome, make_ctx, quality, tiny_space
from petlsearch.strategies.optuna import OptunaSearch

out = Path(sys.argv[1])
space = tiny_space()
calls = []

def objective(placements, report, train=None):
    calls.append(1)
    if len(calls) == 4:  # the 4th trial hangs until the test kills the process
        (out / "hanging").write_text("1")
        time.sleep(600)
    return Outcome(quality(space, placements))

OptunaSearch(pruner="none").run(make_ctx(space, objective, out, n_trials=6))
"""


def test_resume_after_kill_runs_only_the_remainder(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "hanging").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the search never reached its 4th trial"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    done_before = {r["number"] for r in before if r["status"] == "complete"}
    cut_off = [r for r in before if r["status"] == "running" and r["number"] not in done_before]
    assert len(done_before) == 3 and len(cut_off) == 1

    space = tiny_space()
    calls: list = []
    result = OptunaSearch(pruner="none").run(make_ctx(space, lambda p, r, train=None: calls.append(p) or Outcome(
        quality(space, p)), tmp_path, n_trials=6))
    assert len(calls) == 3 and len(result.history) == 6  # 3 kept + 3 new, none rerun
    assert {r.number for r in result.history} >= done_before
    assert [p.key for p in calls[0]] == [p["site"] + "@" + p["plugin"] for p in cut_off[0]["placements"]]
