"""Smoke mode caps what it says it caps (training steps, trials, task examples), and only when set."""

from __future__ import annotations

import pytest

from petlsearch.runners.trainer import TrainConfig, recipe_groups, train
from petlsearch.smoke import ENV, Smoke, smoke
from tests.helpers import tiny_text_task


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("", False), ("0", False), ("false", False)])
def test_the_variable_turns_it_on(monkeypatch, value: str, on: bool) -> None:
    monkeypatch.setenv(ENV, value)
    assert (smoke() is not None) is on


def test_training_stops_at_the_cap_and_runs_whole_without_it(monkeypatch) -> None:
    task = tiny_text_task(limit=64)
    for value, steps in (("1", Smoke().steps), ("", 5)):
        monkeypatch.setenv(ENV, value)
        model = task.make_model()
        head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
        result = train(model, task, recipe_groups({}, {}, head, TrainConfig()), TrainConfig(steps=5, batch_size=8))
        assert result.steps == steps


def test_a_task_keeps_the_capped_examples(monkeypatch) -> None:
    from petlsearch.runners.tasks import get_task

    monkeypatch.setenv(ENV, "1")
    task = get_task("rotten_tomatoes")
    assert len(task.splits.y_train) == Smoke().examples and len(task.splits.y_val) < 64
