"""SmolLM2-135M, the real Llama-family decoder: generation with the KV cache through every plugin
that allows it gives the tokens of generation without it, a LoRA structure exported to peft gives
identical logits in `PeftModel.from_pretrained`, and a sequence-classification head on the last
token trains through a trial."""

from __future__ import annotations

import copy

import pytest
import torch

from petlsearch.errors import MissingDependencyError, PluginError
from petlsearch.plugins import create_plugin, list_plugins
from petlsearch.plugins.checks import _perturb, _spread
from petlsearch.searchspace.graph import ModelGraph
from tests.helpers import named_model_or_skip

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
# token methods lengthen the input, LST's side decoder keeps no cache of its own: no cached decoding
NO_CACHE = {"prompt_tuning": "do not support decoding with a non-empty KV cache", "attempt": "do not support decoding",
            "vpt": "do not support decoding", "lst": "keeps no KV cache"}


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = named_model_or_skip("smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, dict(AutoTokenizer.from_pretrained(folder)([PROMPT], return_tensors="pt")), folder


@pytest.mark.parametrize("name", list_plugins())
def test_generation_with_the_kv_cache_gives_the_tokens_of_generation_without_it(name: str, smollm2) -> None:
    base, ids, _ = smollm2
    model = copy.deepcopy(base)
    plugin = create_plugin(name)
    sites = plugin.sites(ModelGraph.from_model(model))
    if not sites:
        pytest.skip(f"{name} has no site on SmolLM2 (LlamaForCausalLM)")
    if plugin.needs_data:
        plugin.prepare(model, [{**ids, "labels": ids["input_ids"]}])
    for module in [plugin.attach(model, s, plugin.config(s)) for s in _spread(sites)]:
        _perturb(module)  # trained weights, so that a cache that forgot the module would show
    with torch.no_grad():
        if name in NO_CACHE:
            with pytest.raises(PluginError, match=NO_CACHE[name]):
                model.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=True)
            return
        cached = model.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=False)
        moved = (model(**ids).logits - base(**ids).logits).abs().max()
    assert torch.equal(cached, uncached), f"{name}: cached {cached.tolist()} != uncached {uncached.tolist()}"
    assert cached.shape[1] == ids["input_ids"].shape[1] + 6
    assert moved > 1e-5, f"{name}'s modules do not change the model they are generating with"


def test_lora_on_smollm2_exports_to_peft_with_identical_logits(smollm2, tmp_path) -> None:
    from peft import PeftModel

    from petlsearch.plugins import create_plugins
    from petlsearch.runners.export import export_peft
    from petlsearch.searchspace.space import SearchSpace

    base, ids, folder = smollm2
    model = copy.deepcopy(base)
    graph = ModelGraph.from_model(model)
    space = SearchSpace.from_graph(graph, create_plugins(["lora"]), roles=("attn.q", "attn.v"))
    ranks = {c.site.key: 2 if c.site.layer == 0 else 4 for c in space.candidates}
    placements = [c.placement({"rank": ranks[c.site.key], "alpha": 8, "dropout": 0.0}) for c in space.candidates]
    structure = space.structure(placements)
    structure.backbone.name = str(folder)
    applied = structure.apply(model, space.plugins)
    torch.manual_seed(0)
    for _, module in applied.modules:
        _perturb(module)
    applied.save_weights(tmp_path / "weights.safetensors")
    structure.save(tmp_path / "structure.yaml")
    out = export_peft(structure, tmp_path / "structure.yaml", backbone=base)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        ours, peft_logits, bare = model(**ids).logits, theirs(**ids).logits, base(**ids).logits
    assert (ours - bare).abs().max() > 1e-2  # the LoRA weights matter
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=1e-4)
    assert len(space.candidates) == 2 * 30  # q and v of every one of the 30 layers


def test_a_sequence_classification_head_on_the_last_token_trains(smollm2) -> None:
    """Classification with a decoder: the default task on SmolLM2 with LoRA, through a trial."""
    from petlsearch.plugins import create_plugins
    from petlsearch.runners.tasks import get_task
    from petlsearch.runners.trainer import TrainConfig
    from petlsearch.runners.trial import run_trial
    from petlsearch.searchspace.space import SearchSpace

    task = get_task("rotten_tomatoes", "smollm2", limit=64, max_length=32)
    model = task.make_model()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.pad_token_id is not None
    graph = ModelGraph.from_model(model)
    assert [n.path for n in graph.find(role="head")] == ["score"]
    space = SearchSpace.from_graph(graph, create_plugins(["lora"]), roles=("attn.q", "attn.v"), layers=[29])
    outcome = run_trial(task, [c.placement({}) for c in space.candidates], space.plugins,
                        TrainConfig(steps=2, batch_size=4, device="cpu", max_eval_examples=8))
    assert outcome.params == space.count([c.placement({}) for c in space.candidates]) > 0
    assert outcome.head_params == 576 * 2 and 0.0 <= outcome.score <= 1.0


def _digit_features(n: int) -> torch.Tensor:
    """EfficientNet-Lite0's pooled ImageNet features (1280) of n of scikit-learn's real digit images."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from petlsearch.runners.data import efficientnet_lite0

    try:
        net = efficientnet_lite0(10).eval()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    images = torch.as_tensor(load_digits().images[:n], dtype=torch.float32) / 16.0
    x = F.interpolate(images[:, None].expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear")
    with torch.no_grad():
        return net.extract_features(x).mean((2, 3))


def test_magma_image_prefix_and_adapters_on_smollm2_with_real_image_features(smollm2) -> None:
    """MAGMA on the real decoder with real image features: the prefix changes what the model says
    about the image, gate 0 removes it, and cached generation gives the uncached tokens."""
    from petlsearch.plugins.context import use

    base, ids, _ = smollm2
    model = copy.deepcopy(base)
    features = _digit_features(1)
    plugin = create_plugin("magma", image_dim=features.shape[-1])
    sites = plugin.sites(ModelGraph.from_model(model))
    prefix = next(s for s in sites if s.kind == "tokens")
    adapters = [s for s in sites if s.kind == "sequential"]
    assert len(adapters) == 30
    modules = [plugin.attach(model, s, plugin.config(s)) for s in (prefix, adapters[0], adapters[-1])]
    for m in modules:
        _perturb(m)
    with torch.no_grad(), use(image_features=features):
        seen = model(**ids).logits
        cached = model.generate(**ids, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(**ids, max_new_tokens=5, do_sample=False, use_cache=False)
    with torch.no_grad():
        text_only = model(**ids).logits
    assert seen.shape[1] == ids["input_ids"].shape[1] + 1  # one prefix position for pooled (B, F) features
    assert (seen[:, 1:] - text_only).abs().max() > 1e-3  # the image changes what follows
    assert torch.equal(cached, uncached)
    for m in modules:
        m.gate = 0.0
    with torch.no_grad(), use(image_features=features):
        torch.testing.assert_close(model(**ids).logits, base(**ids).logits, atol=1e-5, rtol=1e-5)
