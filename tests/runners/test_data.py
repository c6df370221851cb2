"""Data sources: real offline defaults, the user's own files, and clear errors for bad data."""

from __future__ import annotations

import numpy as np
import pytest

from petlsearch.errors import TaskError
from petlsearch.runners import data as D
from petlsearch.runners.tasks import get_task


def test_rotten_tomatoes_splits_are_fixed_stratified_and_deduplicated() -> None:
    a, b = D.rotten_tomatoes(seed=0), D.rotten_tomatoes(seed=0)
    n = len(a.y_train) + len(a.y_val) + len(a.y_test)
    assert 11_000 < n < 12_808  # 12,808 fresh/rotten minus duplicates
    assert a.x_val == b.x_val
    assert len(set(a.x_train) & set(a.x_test)) == 0
    for y in (a.y_train, a.y_val, a.y_test):
        assert abs(y.mean() - a.y_train.mean()) < 0.02  # same class balance in every split
    assert a.classes == ("rotten", "fresh")


def test_csv_file_and_errors(tmp_path) -> None:
    ok = tmp_path / "ok.csv"
    ok.write_text("sentence,sentiment\n" + "\n".join(f"text {i},{'pos' if i % 2 else 'neg'}" for i in range(40)))
    splits = D.text_file(ok, "sentence", "sentiment")
    assert splits.classes == ("neg", "pos") and len(splits.y_train) == 32
    with pytest.raises(TaskError, match="missing column"):
        D.text_file(ok, "text", "label")
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\nc,x\n")
    with pytest.raises(TaskError, match="only one class"):
        D.text_file(one)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TaskError, match="empty.csv"):
        D.text_file(empty)
    with pytest.raises(TaskError, match="no such file"):
        D.text_file(tmp_path / "nope.csv")


def test_jsonl_with_split_column(tmp_path) -> None:
    import json

    rows = [{"text": f"t{i}", "label": i % 2, "split": ["train", "val", "test"][i % 3]} for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    s = D.text_file(path)
    assert len(s.y_train) == len(s.y_val) == len(s.y_test) == 10


def test_image_folder_errors(tmp_path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(TaskError, match="broken.png: unreadable image"):
        D.image_folder(tmp_path, size=8)


def test_unknown_task_and_model_suggest() -> None:
    with pytest.raises(TaskError, match="did you mean 'rotten_tomatoes'"):
        get_task("rotten_tomatos")
    with pytest.raises(TaskError, match="unknown model 'minilmm'.*did you mean 'minilm'"):
        get_task("rotten_tomatoes", "minilmm")


def test_digits_task_batches() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    task = get_task("digits", image_size=32)
    batch = next(task.batches("train", 8))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["labels"].shape == (8,)


def test_new_head_is_the_same_in_every_process_and_leaves_the_callers_random_state() -> None:
    """The head is drawn from a fixed seed: torch seeds each process at random, and a head drawn
    from the global state made a run depend on what its process had done before."""
    import torch
    from torch import nn

    from petlsearch.runners.tasks import Task

    def heads(draws_before: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(draws_before)
        task = Task("t", "text", D.Splits([], np.zeros(0), [], np.zeros(0), [], np.zeros(0), ("a", "b")),
                    "linear", lambda: nn.Linear(4, 2), encode=lambda items: {})
        state = torch.random.get_rng_state()
        model = task.make_model()
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream is untouched
        return model.weight.detach(), task.make_model().weight.detach()

    first, copy = heads(1)
    assert torch.equal(first, copy)
    assert torch.equal(first, heads(2)[0])  # another prior state, the same head
