"""A search against a real multi-node Ray cluster (two nodes on this machine, ray.cluster_utils), and
one of its nodes killed in the middle: the trials it held are retried on the other, none is lost."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from petlsearch.plugins import create_plugins  # noqa: E402
from petlsearch.searchspace.budget import Budget  # noqa: E402
from petlsearch.searchspace.graph import ModelGraph  # noqa: E402
from petlsearch.searchspace.space import SearchSpace  # noqa: E402
from petlsearch.strategies.base import SearchContext  # noqa: E402
from petlsearch.strategies.ray_tune import RayTuneSearch  # noqa: E402
from tests.strategies.test_ray import FAST  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TRIALS = 4


def test_a_search_on_a_two_node_cluster_survives_losing_a_node(tiny_task, tmp_path) -> None:
    from ray.cluster_utils import Cluster

    from petlsearch.runners.trial import run_trial

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 100 * 2**20})
    worker = cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    seen = tmp_path / "nodes"
    seen.mkdir()
    space = SearchSpace.from_graph(ModelGraph.from_model(tiny_task.make_model()), create_plugins(["lora", "bitfit"]),
                                   roles=("attn.q",))

    def objective(placements, report, train=None):  # runs on whichever node Ray picks
        node = ray.get_runtime_context().get_node_id()
        (seen / f"{node}-{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(4)  # a trial long enough to be cut off
        return run_trial(tiny_task, placements, space.plugins, FAST, report=report)

    out = tmp_path / "run"
    killed = threading.Event()

    def kill_the_worker_once_it_trains() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len({p.name.split("-")[0] for p in seen.iterdir()}) < 2:
            time.sleep(0.2)  # until both nodes run a trial
        cluster.remove_node(worker, allow_graceful=False)
        killed.set()

    watcher = threading.Thread(target=kill_the_worker_once_it_trains, daemon=True)
    try:
        ctx = SearchContext(space, Budget.parse("1000"), None, FAST, n_trials=TRIALS, out_dir=out,
                            objective=objective)
        watcher.start()
        result = RayTuneSearch(address=cluster.address, max_failures=3, scheduler="fifo").run(ctx)
        assert killed.is_set(), "the worker node was never seen training"
        assert len({p.name.split("-")[0] for p in seen.iterdir()}) == 2  # trials ran on both nodes
        trained = sorted(r.number for r in result.history)
        assert len(trained) + result.extras["rejected"] == TRIALS and len(trained) >= 2  # rejected: never trained
        assert all(r.status == "complete" for r in result.history)  # none lost with the node
        assert len(list(seen.iterdir())) > len(trained)  # the trial the node held ran again elsewhere
        journal = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
        assert sorted(r["number"] for r in journal if r["status"] == "complete") == trained
        assert cluster.list_all_nodes() == [cluster.head_node]  # the worker is gone
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
