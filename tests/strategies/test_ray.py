"""RayTuneSearch on a local Ray: real training, retries and failures, restore after an interruption."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from petlsearch.plugins import (
    _tiny,  # noqa: E402
    create_plugins,
)
from petlsearch.runners.trainer import TrainConfig  # noqa: E402
from petlsearch.searchspace.budget import Budget  # noqa: E402
from petlsearch.searchspace.graph import ModelGraph  # noqa: E402
from petlsearch.searchspace.space import SearchSpace  # noqa: E402
from petlsearch.strategies.base import SearchContext  # noqa: E402
from petlsearch.strategies.ray_tune import RayTuneSearch  # noqa: E402
from tests.strategies.test_optuna import Outcome, quality  # noqa: E402

pytestmark = pytest.mark.ray
FAST = TrainConfig(steps=4, batch_size=16, eval_every=2, max_eval_examples=32)


def tiny_space() -> SearchSpace:
    return SearchSpace.from_graph(ModelGraph.from_model(_tiny.bert()), create_plugins(["lora", "bitfit"]), roles=("attn.q", "attn.v"))


def calls_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_real_training_on_local_ray_retries_a_dying_trial(tiny_task, tmp_path):
    from petlsearch.runners.trial import run_trial

    space = SearchSpace.from_graph(ModelGraph.from_model(tiny_task.make_model()), create_plugins(["lora", "bitfit"]),
                                   roles=("attn.q",))
    marker = tmp_path / "died_once"

    def objective(placements, report, train=None):  # shipped to the workers with cloudpickle
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL)  # the very first call dies, once
        except FileExistsError:
            return run_trial(tiny_task, placements, space.plugins, FAST, report=report)
        os.close(fd)
        raise RuntimeError("worker lost (simulated)")

    ctx = SearchContext(space, Budget.parse("1000"), None, FAST, n_trials=2, out_dir=tmp_path / "run",
                        objective=objective)
    assert not ray.is_initialized()
    result = RayTuneSearch(num_cpus=2, max_failures=1).run(ctx)
    assert not ray.is_initialized()  # it started Ray, so it shut it down
    assert marker.exists() and len(result.history) == 2
    assert all(r.status in ("complete", "pruned") and r.intermediate for r in result.history)
    assert space.count(result.best) <= 1000
    assert (tmp_path / "run" / "trials.jsonl").exists() and (tmp_path / "run" / "ray" / "tune").is_dir()


def test_failing_trial_is_recorded_and_callers_ray_is_left_running(tmp_path):
    space = tiny_space()
    calls, first = tmp_path / "calls", tmp_path / "first"

    def key(placements) -> str:
        return ";".join(sorted(f"{p.key}{sorted(p.config.items())}" for p in placements))

    def objective(placements, report, train=None):
        calls.mkdir(exist_ok=True)
        (calls / f"{len(calls_in(calls))}-{os.getpid()}").write_text("")
        try:
            fd = os.open(first, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, key(placements).encode())
            os.close(fd)
        except FileExistsError:
            pass
        if key(placements) == first.read_text():  # the first structure fails on every retry
            raise ValueError("broken structure (simulated)")
        report(2, quality(space, placements) / 2)
        return Outcome(quality(space, placements))

    ctx = SearchContext(space, Budget.parse("1000"), None, FAST, n_trials=3, out_dir=tmp_path / "run",
                        objective=objective)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    try:
        result = RayTuneSearch(max_failures=1).run(ctx)
        assert ray.is_initialized()  # the caller's Ray is left running
    finally:
        ray.shutdown()
    failed = [r for r in result.history if r.status == "failed"]
    assert len(result.history) == 3 and failed and all("broken structure" in r.error for r in failed)
    assert all(key(r.structure()) == first.read_text() for r in failed)
    assert len(calls_in(calls)) == 3 + len(failed)  # each failed trial ran twice (one retry)


def test_interrupted_search_is_restored_without_rerunning_finished_trials(tmp_path):
    space = tiny_space()
    calls, driver = tmp_path / "calls", os.getpid()
    calls.mkdir()

    def objective(placements, report, train=None):
        n = len(calls_in(calls))
        (calls / str(n)).write_text("")
        if n == 1 and not (tmp_path / "interrupted").exists():  # Ctrl-C while the 2nd trial trains
            (tmp_path / "interrupted").write_text("")
            os.kill(driver, signal.SIGINT)
            time.sleep(60)
        return Outcome(quality(space, placements))

    def ctx():
        return SearchContext(space, Budget.parse("1000"), None, FAST, n_trials=3, out_dir=tmp_path / "run",
                             objective=objective)

    with pytest.raises(KeyboardInterrupt, match="restore"):
        RayTuneSearch(num_cpus=2, max_concurrent=1).run(ctx())
    assert not ray.is_initialized() and calls_in(calls) == ["0", "1"]
    result = RayTuneSearch(num_cpus=2, max_concurrent=1).run(ctx())
    assert sorted(r.number for r in result.history) == [0, 1, 2]
    assert all(r.status == "complete" for r in result.history)
    assert calls_in(calls) == ["0", "1", "2", "3"]  # trial 0 kept, trial 1 rerun, trial 2 new


def test_unknown_scheduler_is_a_clear_error() -> None:
    from petlsearch.errors import PetlsearchError
    from petlsearch.strategies.base import get_strategy

    with pytest.raises(PetlsearchError, match="unknown scheduler 'hyperband'; valid: 'asha', 'fifo'"):
        get_strategy("ray", scheduler="hyperband")
