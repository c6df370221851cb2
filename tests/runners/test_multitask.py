"""Multi-task mixtures: per-task heads, per-task and shared placements, mixed-task training."""

from __future__ import annotations

import torch

from petlsearch.plugins import create_plugin, create_plugins, plugins_for
from petlsearch.runners.multitask import multitask
from petlsearch.runners.trainer import TrainConfig
from petlsearch.runners.trial import run_trial
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.structure import Backbone, Placement, Structure
from tests.helpers import tiny_text_task


def _mix():
    return multitask({"a": tiny_text_task(limit=64, seed=0), "b": tiny_text_task(limit=64, seed=1)})


def test_per_task_placements_act_only_for_their_task(tmp_path) -> None:
    mix = _mix()
    model = mix.make_model().eval()
    graph = ModelGraph.from_model(model)
    assert [n.name for n in graph.find(role="head")] == ["head.a", "head.b"]
    only_a = Placement("encoder.L0.attn.q:weight", "lora", {"rank": 2, "alpha": 4, "dropout": 0.0}, tasks=["a"])
    shared = Placement("encoder.L1.attn.v:weight", "lora", {"rank": 2, "alpha": 4, "dropout": 0.0})
    structure = Structure(Backbone(), [only_a, shared])
    loaded = Structure.load(structure.save(tmp_path / "s.yaml"))
    assert loaded.placements[0].tasks == ["a"] and loaded.placements[1].tasks is None
    batch = next(mix.batches("val", 4))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "task")}
    with torch.no_grad():
        base = {t: model(task=t, **inputs).logits for t in ("a", "b")}
    applied = loaded.apply(model, plugins_for(loaded), graph)
    for _, m in applied.modules:
        torch.nn.init.normal_(m.lora_B)
    applied.modules[1][1].gate = 0.0  # switch the shared module off: only the per-task one is left
    with torch.no_grad():
        out_b = model(task="b", **inputs).logits
        out_a = model(task="a", **inputs).logits
    assert torch.equal(out_b, base["b"])
    assert not torch.allclose(out_a, base["a"])


def test_mixed_task_training_and_per_task_metrics() -> None:
    mix = _mix()
    stream = mix.batches("train", 8, shuffle=True, epochs=None)
    assert {next(stream)["task"] for _ in range(20)} == {"a", "b"}
    placements = [Placement(f"encoder.L{i}.attn.q:weight", "lora", {"rank": 2, "alpha": 4, "dropout": 0.0})
                  for i in range(2)]
    out = run_trial(mix, placements, {"lora": create_plugin("lora")}, TrainConfig(steps=4, batch_size=8), test=True)
    assert {"a/accuracy", "b/accuracy", "accuracy"} <= set(out.metrics)
    assert out.metrics["accuracy"] == (out.metrics["a/accuracy"] + out.metrics["b/accuracy"]) / 2
    assert out.head_params == 2 * (32 * 2 + 2)


def test_task_keys_are_readable_module_names() -> None:
    from petlsearch.runners.multitask import task_keys

    keys = task_keys(["rotten_tomatoes", "csv:data/my.reviews.csv", "csv:/elsewhere/my.reviews.csv",
                      "jsonl:x/tweets 2024.jsonl"])
    assert list(keys.values()) == ["rotten_tomatoes", "my_reviews", "my_reviews_2", "tweets_2024"]
    assert all("." not in k for k in keys.values())


def test_a_mixture_names_its_bad_keys() -> None:
    import pytest

    from petlsearch.errors import TaskError

    with pytest.raises(TaskError, match="cannot be empty or contain '.'"):
        multitask({"csv:reviews.csv": tiny_text_task(limit=64), "b": tiny_text_task(limit=64, seed=1)})


def test_a_file_task_in_a_mixture_trains_with_task_aware_plugins(tmp_path) -> None:
    """A user's CSV beside the default task, by the CLI's spec, with ATTEMPT and VL-Adapter built by name
    (without task names: one target prompt and one adapter serve both tasks) and a per-task head."""
    import csv

    from petlsearch.runners import data as D
    from petlsearch.runners.tasks import get_task
    from petlsearch.searchspace.space import SearchSpace

    splits = D.rotten_tomatoes(0)
    path = tmp_path / "my.reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([t, "pos" if y else "neg"] for t, y in zip(splits.x_train[:80], splits.y_train[:80]))
    mix = get_task(f"multi:rotten_tomatoes+csv:{path}", limit=48)
    assert list(mix.tasks) == ["rotten_tomatoes", "my_reviews"]
    tiny = tiny_text_task(limit=48)
    mix.model_factory = mix.tasks["rotten_tomatoes"].model_factory = tiny.model_factory  # a tiny backbone
    graph = ModelGraph.from_model(mix.make_model())
    space = SearchSpace.from_graph(graph, create_plugins(["attempt", "vl_adapter", "lora"]))
    first = {}
    for c in space.candidates:  # one placement per plugin, at its smallest size
        first.setdefault(c.plugin, c.placement(c.min_config))
    placements = list(first.values())
    out = run_trial(mix, placements, space.plugins, TrainConfig(steps=3, batch_size=8), test=True)
    assert {"rotten_tomatoes/accuracy", "my_reviews/accuracy"} <= set(out.test)
