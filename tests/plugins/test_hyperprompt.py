"""HyperPrompt: exact counts with one shared hypernetwork, the generated prompts, task conditioning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.context import use
from petlsearch.plugins.hyperprompt import HyperPrompt
from tests.helpers import frozen_tiny as _frozen
from tests.helpers import trainable_numel as _trainable


def _run(model, family: str = "bert") -> torch.Tensor:
    with torch.no_grad():
        return tiny.output_tensor(model(**tiny.inputs(family)))


def test_counts_by_formula_with_one_shared_hypernetwork():
    plugin = HyperPrompt(tasks=("a", "b", "c"))
    model, graph = _frozen("llama")  # d = 32, keys 2 heads x 8 = 16 (GQA)
    sites = plugin.sites(graph)
    cfg = plugin.config(sites[0], {"length": 5, "bottleneck": 4, "task_dim": 6})
    assert plugin.count(sites[0], cfg) == 5 * 32 + 6  # global prompt P_m and layer embedding z_m
    t, d, b, kv = 6, 32, 4, 16
    shared = 3 * t + (2 * t * t + t) + (t * t + t) + 2 * ((t + 1) * d * b + (t + 1) * b * kv)
    assert plugin.shared_count(sites[0], cfg) == shared
    mods = [plugin.attach(model, s, cfg) for s in sites]
    assert mods[0].shared_hyper is mods[1].shared_hyper
    assert _trainable(model) == len(sites) * plugin.count(sites[0], cfg) + shared


def test_prompts_are_generated_by_the_hypernetwork():
    plugin = HyperPrompt(tasks=("a", "b"))
    model, graph = _frozen()
    site = plugin.sites(graph)[1]
    m = plugin.attach(model, site, {"length": 3, "bottleneck": 4, "task_dim": 8})
    hyper = m.shared_hyper
    with use(task="b"), torch.no_grad():
        k, v = m.prefix()
        aware = hyper.projector(torch.cat([hyper.task_embedding[1], m.layer_embedding]))
        want = []
        for i in range(2):
            down = hyper.down[i](aware).view(4, 32)
            up = hyper.up[i](aware).view(32, 4)
            want.append(F.linear(F.relu(F.linear(m.prompt, down)), up).view(3, 4, 8).transpose(0, 1))
    assert k.shape == (4, 3, 8)
    torch.testing.assert_close(k, want[0])
    torch.testing.assert_close(v, want[1])


def test_task_conditions_the_prompts():
    plugin = HyperPrompt(tasks=("a", "b"))
    model, graph = _frozen()
    for s in plugin.sites(graph):
        plugin.attach(model, s, {"length": 4})
    with use(task="a"):
        a = _run(model)
    with use(task="b"):
        b = _run(model)
    assert (a - b).abs().max() > 1e-6
    with pytest.raises(PluginError, match="no current task"):
        _run(model)
    with use(task="zzz"), pytest.raises(PluginError, match="unknown task"):
        _run(model)


def test_only_the_current_tasks_embedding_gets_gradient():
    plugin = HyperPrompt(tasks=("a", "b"))
    model, graph = _frozen()
    mods = [plugin.attach(model, s, {"length": 4}) for s in plugin.sites(graph)]
    with use(task="a"):
        tiny.output_tensor(model(**tiny.inputs("bert"))).sum().backward()
    grad = mods[0].shared_hyper.task_embedding.grad
    assert grad[0].abs().sum() > 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert all(m.prompt.grad.abs().sum() > 0 and m.layer_embedding.grad.abs().sum() > 0 for m in mods)


def test_single_task_needs_no_context_and_self_attention_only():
    plugin = HyperPrompt()
    model, graph = _frozen("t5")
    sites = plugin.sites(graph)
    assert {s.role for s in sites} == {"attn"} and len(sites) == 4  # encoder and decoder self-attention
    base = _run(model, "t5")
    for s in sites:
        plugin.attach(model, s)
    assert (_run(model, "t5") - base).abs().max() > 1e-6


def test_hyper_prompts_start_small_beside_the_attentions_own_keys_and_values():
    # at PyTorch's default init of the generators they came out 3-4x the layer's own keys and values,
    # and on MiniLM training collapsed to the majority class at every rate (docs/benchmarks.md)
    plugin = HyperPrompt()
    model, graph = _frozen()
    site = plugin.sites(graph)[0]
    m = plugin.attach(model, site, {"length": 16})
    attention, seen = model.get_submodule(site.path), {}
    hooks = [getattr(attention, name).register_forward_hook(lambda _m, _i, out, name=name: seen.update({name: out}))
             for name in ("key", "value")]
    with torch.no_grad():
        model(**tiny.inputs("bert"))
        k, v = m.prefix()
    for h in hooks:
        h.remove()
    assert 0 < k.std() < 0.1 * seen["key"].std()
    assert 0 < v.std() < 0.1 * seen["value"].std()
