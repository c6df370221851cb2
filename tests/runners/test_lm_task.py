"""Causal LM tasks: a decoder from a local folder, LoRA on its fused qkv, next-token metrics."""

from __future__ import annotations

import pytest

from petlsearch.errors import TaskError
from petlsearch.plugins import create_plugin
from petlsearch.runners.tasks import get_task
from petlsearch.runners.trainer import TrainConfig
from petlsearch.runners.trial import run_trial
from petlsearch.searchspace.structure import Placement


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from petlsearch.runners.data import minilm_path

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # a real vocabulary
    GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4,
                               n_positions=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_lm_task_trains_lora_and_reports_perplexity(lm_folder, tmp_path) -> None:
    from petlsearch.runners.data import rotten_tomatoes

    text = tmp_path / "reviews.txt"
    text.write_text("\n".join(rotten_tomatoes().x_train[:80]))
    task = get_task(f"lm:{text}", str(lm_folder), max_length=24)
    assert task.kind == "lm" and task.metric == "token_accuracy"
    assert task.model_name == lm_folder.name  # the folder's name, not its path (as for a text task)
    placements = [Placement(f"decoder.L{i}.attn.qkv:weight", "lora", {"rank": 4, "alpha": 8, "dropout": 0.0})
                  for i in range(2)]
    out = run_trial(task, placements, {"lora": create_plugin("lora")}, TrainConfig(steps=4, batch_size=8),
                    test=True)
    assert out.params == 2 * 4 * (32 + 96) and out.head_params == 0  # the LM head stays frozen (tied)
    saved = run_trial(task, placements, {"lora": create_plugin("lora")}, TrainConfig(steps=1, batch_size=8),
                      weights_path=tmp_path / "weights.safetensors")
    assert (tmp_path / "weights.safetensors").exists() and not (tmp_path / "head.safetensors").exists()
    assert saved.params == out.params
    assert 0.0 <= out.score <= 1.0 and out.metrics["perplexity"] > 1.0
    assert set(out.test) >= {"token_accuracy", "perplexity", "loss"}


def test_an_lm_search_is_judged_against_the_pretrained_model(lm_folder, tmp_path, caplog) -> None:
    """A causal LM has no new head: its baseline is the pretrained model as it is, before and after
    perplexity in the log and in the result."""
    import logging

    from petlsearch.runners.data import rotten_tomatoes
    from petlsearch.runners.search import search

    text = tmp_path / "reviews.txt"
    text.write_text("\n".join(rotten_tomatoes().x_train[:80]))
    task = get_task(f"lm:{text}", str(lm_folder), max_length=24)
    with caplog.at_level(logging.INFO):
        run = search(task=task, budget="2k", strategy="random", plugins=["lora"], trials=2,
                     fidelity=TrainConfig(steps=2, batch_size=8), final=TrainConfig(steps=30, batch_size=8), seed=0)
    result = run.structure.result
    assert set(result["baselines"]) == {"pretrained"} and result["pretrained"]["perplexity"] > 1.0
    assert result["beats_baselines"] == (result["test"]["token_accuracy"] > result["baselines"]["pretrained"])
    assert result["test"]["perplexity"] < result["pretrained"]["perplexity"]  # 30 steps on random weights learn
    assert "baseline: the pretrained model as it is" in caplog.text and "test perplexity" in caplog.text


def test_limit_and_smoke_mode_cap_an_lm_task(lm_folder, tmp_path, monkeypatch) -> None:
    from petlsearch.runners.data import rotten_tomatoes

    text = tmp_path / "reviews.txt"
    text.write_text("\n".join(rotten_tomatoes().x_train[:200]))

    def size(task) -> int:
        return sum(len(task.splits.split(s)[1]) for s in ("train", "val", "test"))

    lines = [t for t in text.read_text().splitlines() if t.strip()]  # a snippet may hold a line break
    assert size(get_task(f"lm:{text}", str(lm_folder))) == len(lines) >= 200
    assert size(get_task(f"lm:{text}", str(lm_folder), limit=40)) == 40
    monkeypatch.setenv("PETLSEARCH_SMOKE", "1")  # smoke mode's cap reaches LM tasks too
    assert size(get_task(f"lm:{text}", str(lm_folder))) == 64


def test_lm_task_errors(tmp_path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\n")
    with pytest.raises(TaskError, match="at least 10"):
        get_task(f"lm:{short}", "gpt2")
    with pytest.raises(TaskError, match="no such file"):
        get_task(f"lm:{tmp_path / 'missing.txt'}", "gpt2")


def test_image_task_with_a_transformers_vit_folder(tmp_path) -> None:
    """An image task on a ViT from a local folder (as a hub name would load it online)."""
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path / "tiny-vit"
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64)).save_pretrained(folder)
    task = get_task("digits", str(folder))
    batch = next(task.batches("train", 4))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    placements = [Placement("vision.L1.attn.q:weight", "lora", {"rank": 2, "alpha": 4, "dropout": 0.0})]
    out = run_trial(task, placements, {"lora": create_plugin("lora")}, TrainConfig(steps=3, batch_size=8))
    assert out.params == 2 * 64 and out.head_params == 32 * 10 + 10


def test_cnn_batchnorm_statistics_stay_frozen() -> None:
    """Training a structure on EfficientNet must not move the backbone's BatchNorm running stats."""
    pytest.importorskip("efficientnet_lite_pytorch")
    import torch

    task = get_task("digits", "efficientnet-lite0", image_size=32)
    before = {k: v.clone() for k, v in task.make_model().state_dict().items() if "running_" in k}
    placements = [Placement("vision.L1.norm.bn1:weight", "bitfit", {})]
    run_trial(task, placements, {"bitfit": create_plugin("bitfit")}, TrainConfig(steps=2, batch_size=8))
    model = task._cache["model"]  # the pristine backbone must be untouched too
    after = {k: v for k, v in model.state_dict().items() if "running_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
