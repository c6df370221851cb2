"""Every plugin on the real pretrained backbones beyond MiniLM: the 12-layer MPNet encoder and the
30-layer SmolLM2 (Llama) decoder. Each plugin that has sites there attaches at a spread of them
(first, last, two between) with its default config: identity at init where it declares it, an
effect once its weights move, and gate 0 giving back the bare model's outputs exactly. A plugin
with no site on the family is reported as skipped with that reason (on MPNet prefix tuning and
HyperPrompt: its attention computes itself instead of dispatching through AttentionInterface, so
no key/value site is offered)."""

from __future__ import annotations

import copy

import pytest
import torch

from petlsearch.plugins import create_plugin, list_plugins
from petlsearch.plugins.checks import _perturb, _run, _spread
from petlsearch.searchspace.graph import ModelGraph
from tests.helpers import named_model_or_skip

pytestmark = pytest.mark.slow
SNIPPETS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate cliches."]


@pytest.fixture(scope="module")
def mpnet():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = named_model_or_skip("mpnet")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    inputs = dict(AutoTokenizer.from_pretrained(folder)(SNIPPETS, padding=True, return_tensors="pt"))
    return model, inputs, {**inputs, "labels": torch.tensor([1, 0])}


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = named_model_or_skip("smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(SNIPPETS[:1], return_tensors="pt")
    inputs = dict(ids)
    return model, inputs, {**inputs, "labels": ids["input_ids"]}


def _check(name: str, backbone: tuple) -> None:
    model, inputs, labelled = backbone
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    plugin = create_plugin(name)
    graph = ModelGraph.from_model(model)
    sites = plugin.sites(graph)
    if not sites:
        pytest.skip(f"{name} has no site on {type(model).__name__}")
    if plugin.needs_data:
        plugin.prepare(model, [labelled])
    base = _run(model, inputs)
    modules = [plugin.attach(model, site, plugin.config(site)) for site in _spread(plugin.sites(graph))]
    if plugin.identity_at_init:
        torch.testing.assert_close(_run(model, inputs), base, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{name} is not the identity at init on the real model: {m}")
    for m in modules:
        _perturb(m)
    moved = _run(model, inputs)
    assert moved.shape != base.shape or not torch.allclose(moved, base, atol=1e-6), f"{name} has no effect"
    for m in modules:
        m.gate = 0.0
    torch.testing.assert_close(_run(model, inputs), base, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{name} at gate 0 still changes the real model's outputs: {m}")


@pytest.mark.parametrize("name", list_plugins())
def test_every_plugin_on_the_real_mpnet(name: str, mpnet) -> None:
    _check(name, mpnet)


@pytest.mark.parametrize("name", list_plugins())
def test_every_plugin_on_the_real_smollm2(name: str, smollm2) -> None:
    _check(name, smollm2)
