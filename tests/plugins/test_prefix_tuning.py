"""Prefix tuning and the kv_prefix mechanism: exact counts, the exact attention of the paper on a tiny
BERT layer, gates, padding and causal masks, sdpa = eager, T5's position bias, GQA, generation."""

from __future__ import annotations

import pytest
import torch

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.mechanisms.kv_prefix import IMPL
from petlsearch.plugins.prefix_tuning import PrefixTuning
from petlsearch.plugins.checks import _perturb
from petlsearch.searchspace.graph import ModelGraph
from tests.helpers import trainable_numel as _trainable


def _frozen(family: str = "bert", impl: str = "sdpa"):
    model = tiny.FAMILIES[family]()
    model.set_attn_implementation(impl)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ModelGraph.from_model(model)


def _run(model, family: str = "bert", **over) -> torch.Tensor:
    with torch.no_grad():
        return tiny.output_tensor(model(**{**tiny.inputs(family), **over}))


def test_counts_by_formula():
    plugin = PrefixTuning()
    model, graph = _frozen("llama")  # GQA: 2 key/value heads of 8 dims, hidden 32
    sites = plugin.sites(graph)
    direct = plugin.config(sites[0], {"length": 5, "reparam": False})
    assert plugin.count(sites[0], direct) == 2 * 5 * 2 * 8 and plugin.shared_key(sites[0], direct) is None
    cfg = plugin.config(sites[0], {"length": 5, "mlp_hidden": 16})
    assert plugin.count(sites[0], cfg) == (16 + 1) * 2 * 16
    assert plugin.shared_count(sites[0], cfg) == 5 * 32 + 32 * 16 + 16
    mods = [plugin.attach(model, s, cfg) for s in sites]
    assert mods[0].shared_mlp is mods[1].shared_mlp  # one embedding + first layer for the stack
    assert _trainable(model) == 2 * plugin.count(sites[0], cfg) + plugin.shared_count(sites[0], cfg)
    assert [m.trainable_count() for m in mods] == [plugin.count(s, cfg) for s in sites]


def test_gate_zero_and_uninstall_leave_the_model_unchanged():
    plugin = PrefixTuning()
    model, graph = _frozen()
    base = _run(model)
    mods = [plugin.attach(model, s, {"length": 4}) for s in plugin.sites(graph)]
    assert model.config._attn_implementation == f"{IMPL}:sdpa"
    assert (_run(model) - base).abs().max() > 1e-6
    for gate in (0.0, torch.tensor(0.0)):
        for m in mods:
            m.gate = gate
        assert torch.equal(_run(model), base)
    mods[0].uninstall()
    assert model.config._attn_implementation == f"{IMPL}:sdpa"  # another prefix still uses the config
    mods[1].uninstall()
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_run(model), base)


def _manual(attn, x, pk, pv, additive_mask, log_gate):
    """softmax(q [pk; k]^T * scale + [log g; mask]) [pv; v], written out; x (B, T, d)."""
    b, t, _ = x.shape
    heads, hd = attn.num_attention_heads, attn.attention_head_size
    q, k, v = (f(x).view(b, t, heads, hd).transpose(1, 2) for f in (attn.query, attn.key, attn.value))
    k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
    prefix_cols = torch.full((b, 1, t, pk.shape[2]), float(log_gate))
    scores = q @ k.transpose(-1, -2) * attn.scaling + torch.cat([prefix_cols, additive_mask], dim=-1)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * hd)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("gate", [1.0, 0.5, "tensor"])
def test_attention_is_softmax_over_prefix_and_keys(impl, gate):
    plugin = PrefixTuning()
    model, graph = _frozen("bert", impl)
    site = plugin.sites(graph)[0]
    module = plugin.attach(model, site, {"length": 3, "reparam": False})
    module.gate = torch.tensor(0.3) if gate == "tensor" else gate
    attn = model.get_submodule(site.path)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, -2:] = False  # two padded keys in the first row
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~pad[:, None, None, :], torch.finfo(torch.float32).min)
    mask = pad[:, None, None, :].expand(2, 1, 6, 6) if impl == "sdpa" else additive
    with torch.no_grad():
        got, _ = attn(x, attention_mask=mask)
        g = module.gate if isinstance(module.gate, float) else module.gate.item()
        want = _manual(attn, x, module.key[None], module.value[None], additive, torch.log(torch.tensor(g)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_stays_masked():
    plugin = PrefixTuning()
    model, graph = _frozen()
    for s in plugin.sites(graph):
        _perturb(plugin.attach(model, s, {"length": 4}))
    ids = tiny.inputs("bert")["input_ids"].clone()
    base = _run(model)
    ids[0, -2:] = torch.tensor([7, 9])  # the padded positions of row 0
    assert torch.allclose(_run(model, input_ids=ids), base, atol=1e-6)


def test_causal_decoder_stays_causal():
    plugin = PrefixTuning()
    model, graph = _frozen("gpt2")
    for s in plugin.sites(graph):
        _perturb(plugin.attach(model, s, {"length": 4}))
    inputs = {"input_ids": tiny.inputs("gpt2")["input_ids"]}
    with torch.no_grad():
        base = model(**inputs).logits
        ids = inputs["input_ids"].clone()
        ids[:, -1] = 3
        moved = model(input_ids=ids).logits
    assert torch.allclose(moved[:, :-1], base[:, :-1], atol=1e-6)  # no mask given: sdpa's is_causal case
    assert (moved[:, -1] - base[:, -1]).abs().max() > 1e-6


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5", "clip", "gpt2-nomask", "llama-nomask"])
def test_sdpa_and_eager_agree(family):
    """Eager always gets a materialised mask; sdpa gets none without padding (its is_causal case)."""
    family, _, nomask = family.partition("-")
    over = {"attention_mask": None} if nomask else {}
    outs = []
    for impl in ("sdpa", "eager"):
        model, graph = _frozen(family, impl)
        plugin = PrefixTuning()
        for i, s in enumerate(plugin.sites(graph)):
            torch.manual_seed(i)
            m = plugin.attach(model, s, {"length": 3, "reparam": i % 2 == 0})
            m.gate = 0.6 if i == 0 else 1.0
        outs.append(_run(model, family, **over))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_t5_prefix_keys_get_no_position_bias():
    plugin = PrefixTuning()
    model, graph = _frozen("t5")
    site = plugin.sites(graph)[0]  # encoder layer 0: computes the relative position bias
    module = plugin.attach(model, site, {"length": 2, "reparam": False})
    attn = model.get_submodule(site.path)
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, bias, _ = attn(x)
        q, k, v = (f(x).view(1, 5, 4, 8).transpose(1, 2) for f in (attn.q, attn.k, attn.v))
        k = torch.cat([module.key[None], k], dim=2)
        v = torch.cat([module.value[None], v], dim=2)
        scores = q @ k.transpose(-1, -2) + torch.cat([torch.zeros(1, 4, 5, 2), bias], dim=-1)  # T5: no scaling
        want = attn.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 32))
    assert bias.shape == (1, 4, 5, 5)  # the bias handed to the next layer is the model's own
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generation_with_cache_matches_without():
    plugin = PrefixTuning()
    model, graph = _frozen("gpt2")
    for s in plugin.sites(graph):
        _perturb(plugin.attach(model, s, {"length": 4}))
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_freeze_prefix_drops_the_mlp_and_keeps_outputs():
    plugin = PrefixTuning()
    model, graph = _frozen()
    site = plugin.sites(graph)[0]
    module = plugin.attach(model, site, {"length": 4, "mlp_hidden": 16})
    _perturb(module)
    before = _run(model)
    module.freeze_prefix()
    assert not module.reparameterised and module.trainable_count() == 0
    assert torch.allclose(_run(model), before, atol=1e-6)
    # the frozen prefix is a reparam=False placement's state
    fresh, _ = _frozen()
    direct = plugin.attach(fresh, site, {"length": 4, "reparam": False})
    direct.load_state_dict(module.state_dict())
    assert torch.allclose(_run(fresh), before, atol=1e-6)


def test_gradients_reach_the_prefix_and_the_shared_mlp():
    plugin = PrefixTuning()
    model, graph = _frozen()
    mods = [plugin.attach(model, s, {"length": 4, "mlp_hidden": 16}) for s in plugin.sites(graph)]
    mods[0].gate = torch.tensor(0.5, requires_grad=True)
    tiny.output_tensor(model(**tiny.inputs("bert"))).sum().backward()
    assert mods[0].shared_mlp.embedding.grad.abs().sum() > 0
    assert all(m.out.weight.grad.abs().sum() > 0 for m in mods)
    assert mods[0].gate.grad is not None and mods[0].gate.grad != 0


def test_unsupported_attention_implementation_is_refused():
    plugin = PrefixTuning()
    model, graph = _frozen()
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(PluginError, match="attn_implementation='sdpa'"):
        plugin.attach(model, plugin.sites(graph)[0])
