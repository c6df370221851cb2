"""run_trial: one structure trained on a fresh backbone, the same whatever ran before it."""

from __future__ import annotations

import torch

from petlsearch.plugins import create_plugins
from petlsearch.runners.trainer import TrainConfig
from petlsearch.runners.trial import run_trial
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.space import SearchSpace


def test_a_trial_is_reproducible_whatever_ran_before(tiny_task, tmp_path):
    space = SearchSpace.from_graph(ModelGraph.from_model(tiny_task.make_model()), create_plugins(["lora"]))
    placements = [c.placement(space.plugins["lora"].config(c.site, {"rank": 2})) for c in space.candidates[:2]]
    cfg = TrainConfig(steps=3, batch_size=8, max_eval_examples=16, seed=5)
    outcomes = []
    for i, noise in enumerate((0, 123)):
        torch.manual_seed(noise)
        torch.randn(1000)  # another history of the global generator (LoRA's A is drawn from it)
        outcomes.append(run_trial(tiny_task, placements, space.plugins, cfg, weights_path=tmp_path / f"{i}.safetensors"))
    assert outcomes[0].score == outcomes[1].score and outcomes[0].train.train_loss == outcomes[1].train.train_loss
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "0.safetensors")), load_file(str(tmp_path / "1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
