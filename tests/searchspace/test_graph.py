"""The model graph: layers, stacks and roles for every family, meta-device graphs, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from petlsearch.plugins import _tiny as tiny
from petlsearch.searchspace.graph import ModelGraph

# (family, {stack: layers}, {role: expected leaf name of its module in layer 0})
EXPECTED = {
    "bert": ({"encoder": 2}, {"attn.q": "query", "attn.k": "key", "attn.v": "value", "attn.o": "dense",
                              "ffn.up": "dense", "ffn.down": "dense", "attn": "self"}),
    "gpt2": ({"decoder": 2}, {"attn.qkv": "c_attn", "attn.o": "c_proj", "ffn.up": "c_fc", "ffn.down": "c_proj",
                              "attn": "attn", "ffn": "mlp"}),
    "t5": ({"encoder": 2, "decoder": 2}, {"attn.q": "q", "attn.k": "k", "attn.v": "v", "attn.o": "o",
                                          "ffn.gate": "wi_0", "ffn.up": "wi_1", "ffn.down": "wo"}),
    "llama": ({"decoder": 2}, {"attn.q": "q_proj", "attn.k": "k_proj", "attn.v": "v_proj", "attn.o": "o_proj",
                               "ffn.gate": "gate_proj", "ffn.up": "up_proj", "ffn.down": "down_proj"}),
    "vit": ({"vision": 2}, {"attn.q": "q_proj", "attn.k": "k_proj", "attn.v": "v_proj", "attn.o": "o_proj",
                            "ffn.up": "fc1", "ffn.down": "fc2"}),
    "clip": ({"text": 2, "vision": 2}, {"attn.q": "q_proj", "attn.k": "k_proj", "attn.v": "v_proj",
                                        "attn.o": "out_proj", "ffn.up": "fc1", "ffn.down": "fc2"}),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_layers_and_roles(family: str) -> None:
    stacks, roles = EXPECTED[family]
    graph = ModelGraph.from_model(tiny.FAMILIES[family]())
    assert {s: len(graph.layers(s)) for s in graph.stacks} == stacks
    for stack in stacks:
        for role, leaf in roles.items():
            for layer in graph.layers(stack):
                found = graph.find(role=role, stack=stack, layer=layer)
                assert len(found) == 1, (family, stack, role, layer, [n.path for n in found])
                assert found[0].path.split(".")[-1] == leaf
                assert found[0].name == f"{stack}.L{layer}.{role}"


def test_t5_cross_attention_and_heads() -> None:
    graph = ModelGraph.from_model(tiny.t5())
    for role in ("xattn.q", "xattn.k", "xattn.v", "xattn.o"):
        assert [n.layer for n in graph.find(role=role)] == [0, 1]
        assert all(n.stack == "decoder" for n in graph.find(role=role))
    assert graph.num_heads("encoder") == 4 and graph.hidden_size("decoder") == 32


def test_llama_grouped_query_attention() -> None:
    graph = ModelGraph.from_model(tiny.llama())
    k = graph.find(role="attn.k", layer=0)[0]
    assert (k.in_features, k.out_features) == (32, 16)  # 2 kv heads x head_dim 8
    assert graph.num_heads("decoder") == 4


def test_gpt2_conv1d_features() -> None:
    qkv = ModelGraph.from_model(tiny.gpt2()).find(role="attn.qkv", layer=1)[0]
    assert (qkv.type, qkv.in_features, qkv.out_features) == ("Conv1D", 32, 96)


def test_same_names_across_bert_and_roberta() -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    roberta = ModelGraph.from_model(RobertaForSequenceClassification(cfg))
    bert = ModelGraph.from_model(tiny.bert())
    names = lambda g: {n.name for n in g.nodes.values() if n.role and n.layer is not None}  # noqa: E731
    assert names(bert) == names(roberta)


def test_meta_device_and_param_counts() -> None:
    with torch.device("meta"):
        model = tiny.llama()
    graph = ModelGraph.from_model(model)
    assert graph.num_parameters(include_head=True) == sum(p.numel() for p in model.parameters())
    assert graph.num_parameters() == graph.num_parameters(include_head=True) - 32 * 100


def test_fingerprint_tracks_shapes_not_values() -> None:
    a, b = tiny.bert(), tiny.bert()
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    assert ModelGraph.from_model(a).fingerprint() == ModelGraph.from_model(b).fingerprint()
    assert ModelGraph.from_model(a).fingerprint() != ModelGraph.from_model(tiny.bert(layers=3)).fingerprint()


def test_efficientnet_conv_roles() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    graph = ModelGraph.from_model(EfficientNet.from_name("efficientnet-lite0", num_classes=10))
    assert len(graph.layers("vision")) == 16
    assert graph.find(role="head")[0].path == "_fc"
    block3 = {n.name for n in graph.find(layer=3, role=("conv", "norm"))}
    assert {"vision.L3.conv.expand_conv", "vision.L3.conv.depthwise_conv", "vision.L3.conv.project_conv"} <= block3


def test_unrecognised_model_warns_and_keeps_sites() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ModelGraph.from_model(model)
    assert any("no repeated blocks" in str(w.message) for w in caught)
    assert len(graph.nodes) == 4


def test_structural_fallback_for_unknown_transformer() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))

    graph = ModelGraph.from_model(Net())
    assert len(graph.layers("encoder")) == 3
    assert graph.find(role="attn.q", layer=2)[0].path == "blocks.2.attention.q"
    assert graph.find(role="ffn.down", layer=0)[0].path == "blocks.0.fc2"


def test_execution_order_and_dataflow() -> None:
    model = tiny.bert()
    graph = ModelGraph.from_model(model)
    order = graph.add_execution_order(model, **tiny.inputs("bert"))
    q0 = "bert.encoder.layer.0.attention.self.query"
    down1 = "bert.encoder.layer.1.output.dense"
    assert order.index(q0) < order.index(down1)
    assert graph.add_dataflow(model, tiny.inputs("bert")) > 0
    assert any(d.get("kind") == "flow" for _, _, d in graph.g.edges(data=True))
