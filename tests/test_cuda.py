"""On a CUDA device: `device="auto"` picks it and trains in bf16 autocast, S3PET's supernet and a
whole search run there, and the memory measurement reads the allocator. Skipped without CUDA (they
are what `scripts/gpu-check.sh` runs first, `pytest -m cuda`)."""

from __future__ import annotations

import pytest
import torch

from petlsearch.plugins import create_plugins
from petlsearch.runners.trainer import TrainConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
FAST = TrainConfig(steps=4, batch_size=8, eval_every=0, max_eval_examples=32, device="auto")


def test_auto_device_trains_a_structure_on_the_gpu_in_bf16(tiny_task, tmp_path) -> None:
    from safetensors.torch import load_file

    from petlsearch.runners.trial import run_trial
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.space import SearchSpace

    space = SearchSpace.from_graph(ModelGraph.from_model(tiny_task.make_model()), create_plugins(["lora", "ia3"]))
    placements = [c.placement(space.plugins[c.plugin].config(c.site)) for c in space.candidates[:4]]
    seen: list[tuple[str, torch.dtype]] = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, _, out: seen.append((out.device.type, out.dtype)) if isinstance(m, torch.nn.Linear) else None)
    try:
        outcome = run_trial(tiny_task, placements, space.plugins, FAST, weights_path=tmp_path / "w.safetensors")
    finally:
        hook.remove()
    assert ("cuda", torch.bfloat16) in seen  # the trainer's autocast on the device `auto` picked
    assert 0.0 <= outcome.score <= 1.0 and outcome.train.train_loss == outcome.train.train_loss
    weights = load_file(str(tmp_path / "w.safetensors"))  # saved from the GPU, loads on the CPU
    assert weights and all(t.device.type == "cpu" for t in weights.values())


def test_s3pet_search_runs_on_the_gpu_under_budget(tiny_task, tmp_path) -> None:
    from petlsearch.runners.search import search

    result = search(task=tiny_task, budget="2%", strategy="s3pet", trials=2, out=tmp_path / "run",
                    fidelity=FAST, final=FAST, plugins=["lora", "adapter", "bitfit"])
    res = result.structure.result
    assert 0 < res["trainable_params"] <= 0.02 * res["backbone_params"]
    assert 0.0 <= res["test"]["accuracy"] <= 1.0


def test_measure_on_cuda_reads_the_allocator_and_lora_needs_less_than_full_finetuning() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from petlsearch.plugins import create_plugin
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.measure import measure

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=512, num_labels=2)
    batch = {"input_ids": torch.randint(1, 1000, (8, 64), device="cuda"), "labels": torch.zeros(8, dtype=torch.long,
                                                                                                   device="cuda")}
    full_model = BertForSequenceClassification(cfg).cuda()
    full = measure(full_model, batch, list(full_model.parameters()))
    model = BertForSequenceClassification(cfg).cuda()
    for p in model.parameters():
        p.requires_grad_(False)
    lora = create_plugin("lora")
    for site in lora.sites(ModelGraph.from_model(model)):
        lora.attach(model, site, lora.config(site))
    small = measure(model, batch)
    assert full.device == small.device == "cuda"
    assert full.total >= full.weights + full.gradients + full.optimizer_state
    assert small.trainable_state < full.trainable_state and small.total < full.total
