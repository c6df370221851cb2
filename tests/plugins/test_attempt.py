"""ATTEMPT: the source-prompt library, the attention mixture, frozen sources, multi-task targets."""

from __future__ import annotations

import math

import pytest
import torch

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins import context
from petlsearch.plugins.attempt import Attempt, load_source_prompt, save_source_prompt
from petlsearch.plugins.prompt_tuning import PromptTuning
from petlsearch.searchspace.graph import ModelGraph

N, H = 4, 32


def _frozen(family: str = "bert"):
    model = tiny.FAMILIES[family]()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def library(tmp_path) -> list:
    """Two source prompts, saved from prompt_tuning modules 'trained' on other tasks."""
    paths = []
    for i, task in enumerate(("mnli", "sst2")):
        model = _frozen()
        plugin = PromptTuning()
        site = plugin.sites(ModelGraph.from_model(model))[0]
        module = plugin.attach(model, site, {"length": N, "init": "random"})
        with torch.no_grad():
            module.prompt.add_(float(i + 1))
        paths.append(save_source_prompt(module, tmp_path / f"{task}.safetensors", task=task))
    return paths


def _attach(model, plugin: Attempt, **cfg):
    site = plugin.sites(ModelGraph.from_model(model))[0]
    return site, plugin.attach(model, site, cfg)


def test_save_and_load_source_prompt(tmp_path) -> None:
    from safetensors import safe_open

    prompt = torch.randn(N, H)
    path = save_source_prompt(prompt, tmp_path / "rte.safetensors", task="rte")
    assert torch.equal(load_source_prompt(path), prompt)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"task": "rte", "length": str(N), "hidden": str(H)}
    with pytest.raises(PluginError):
        save_source_prompt(torch.randn(2, N, H), tmp_path / "bad.safetensors")


def test_count_and_frozen_sources(library) -> None:
    model = _frozen()
    plugin = Attempt(sources=library)
    site, module = _attach(model, plugin, bottleneck=8)
    cfg = plugin.config(site, {"bottleneck": 8})
    assert plugin.dims(site)["length"].low == plugin.dims(site)["length"].high == N  # fixed by the sources
    assert plugin.count(site, cfg) == module.trainable_count() == N * H + 2 * H * 8
    assert module.sources.shape == (2, N, H) and not module.sources.requires_grad
    assert "sources" not in module.state_dict()
    assert torch.equal(module.sources[1], load_source_prompt(library[1]))
    out = model(**tiny.inputs("bert")).logits
    out.square().mean().backward()
    assert module.sources.grad is None
    assert all(p.grad is not None for p in module.parameters())


def test_mixture_weights_and_formula(library) -> None:
    model = _frozen()
    _, module = _attach(model, Attempt(sources=library), bottleneck=8)
    inputs = tiny.inputs("bert")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    toks = module.tokens(embeds, inputs["attention_mask"])  # (B, n, H)
    a = module.last_weights
    assert a.shape == (2, 3) and torch.allclose(a.sum(-1), torch.ones(2)) and (a > 0).all()
    target = module.targets["default"]
    prompts = torch.cat([module.sources, target[None]])
    assert torch.allclose(toks, target + torch.einsum("bs,snh->bnh", a, prompts), atol=1e-6)
    assert module.temperature == pytest.approx(H * math.e)


def test_padding_does_not_change_the_mixture(library) -> None:
    model = _frozen()
    _, module = _attach(model, Attempt(sources=library), bottleneck=8)
    inputs = tiny.inputs("bert")
    ids = inputs["input_ids"].clone()
    ids[0, -2:] = 7  # row 0 is padded there
    e1, e2 = model.get_input_embeddings()(inputs["input_ids"]), model.get_input_embeddings()(ids)
    module.tokens(e1, inputs["attention_mask"])
    w1 = module.last_weights
    module.tokens(e2, inputs["attention_mask"])
    assert torch.equal(w1, module.last_weights)


def test_prompts_prepended_on_bert_with_padding(library) -> None:
    model = _frozen("bert")
    plugin = Attempt()  # no library: the mixture is over the target alone
    _, module = _attach(model, plugin, length=3, bottleneck=4)
    inputs = tiny.inputs("bert")
    keep = int(inputs["attention_mask"][0].sum())
    with torch.no_grad():
        padded = model(**inputs).logits[:1]
        single = model(input_ids=inputs["input_ids"][:1, :keep]).logits
    assert torch.allclose(padded, single, atol=1e-5)
    assert torch.allclose(module.last_weights, torch.ones(1, 1))


def test_multi_task_targets_and_shared_attention(library) -> None:
    model = _frozen()
    plugin = Attempt(sources=library, tasks=("rte", "cola"))
    site, module = _attach(model, plugin, bottleneck=8)
    count = plugin.count(site, plugin.config(site, {"bottleneck": 8}))
    assert count == module.trainable_count() == 2 * N * H + 2 * H * 8
    inputs = tiny.inputs("bert")
    with context.use(task="rte"):
        model(**inputs).logits.sum().backward()
    assert module.targets["rte"].grad is not None and module.targets["cola"].grad is None
    assert module.down.weight.grad is not None
    with torch.no_grad(), context.use(task="cola"):
        cola = model(**inputs).logits
    with torch.no_grad(), context.use(task="rte"):
        rte = model(**inputs).logits
    assert not torch.allclose(cola, rte)
    with pytest.raises(PluginError, match="cola"), torch.no_grad():
        model(**inputs)  # no task set


def test_library_api(library, tmp_path) -> None:
    plugin = Attempt(sources=library[:1])
    plugin.add_source(library[1])
    assert [str(p) for p in plugin.sources] == [str(p) for p in library]
    wrong = save_source_prompt(torch.randn(N + 1, H), tmp_path / "wrong.safetensors")
    with pytest.raises(PluginError, match="share"):
        plugin.add_source(wrong)
    plugin.remove_source(library[0])
    with pytest.raises(PluginError, match="not in the library"):
        plugin.remove_source(library[0])
    model = _frozen()
    _, module = _attach(model, plugin, bottleneck=8)
    assert module.sources.shape == (1, N, H)
    assert torch.equal(module.sources[0], load_source_prompt(library[1]))


def test_hidden_size_mismatch_is_an_error(tmp_path) -> None:
    path = save_source_prompt(torch.randn(N, H + 1), tmp_path / "big.safetensors")
    model = _frozen()
    with pytest.raises(PluginError, match="hidden size"):
        _attach(model, Attempt(sources=[path]), bottleneck=8)
