"""Roles from structure (searchspace.structural): where the name rules know no name for a block's
Linear layers, their shapes and order still give every attention and FFN role.

Eight families people fine-tune today, none of them among the families the other tests use, built
from configs on the meta device; `petlsearch graph` on each must show every attention and FFN role
in every layer, and say which came from the structure. Then the same models with every module
inside their blocks renamed to meaningless names: the structure alone must give the roles the
names gave.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest
import torch
import transformers as T

from petlsearch.cli import main
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.roles import LINEAR_TYPES

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
         "vocab_size": 100}
ATTN, GATED = {"attn.q", "attn.k", "attn.v", "attn.o"}, {"ffn.gate", "ffn.up", "ffn.down"}
# family: (config, every block's roles, the roles only the structure can find)
FAMILIES = {
    "deberta-v2": (T.DebertaV2Config(**SMALL, max_position_embeddings=64), ATTN | {"ffn.up", "ffn.down"},
                   {"attn.q", "attn.k", "attn.v"}),  # query_proj, key_proj, value_proj
    "funnel": (T.FunnelConfig(d_model=32, n_head=4, d_head=8, d_inner=64, block_sizes=[1, 1], vocab_size=100,
                             architectures=["FunnelModel"]),
               ATTN | {"ffn.up", "ffn.down"}, ATTN | {"ffn.up", "ffn.down"}),  # q_head, post_proj, linear_1
    "hubert": (T.HubertConfig(**SMALL, conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3),
                              num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2),
               ATTN | {"ffn.up", "ffn.down"}, {"ffn.up", "ffn.down"}),  # intermediate_dense, output_dense
    "phi3": (T.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0), {"attn.qkv", "attn.o", "ffn.up", "ffn.down"},
             {"ffn.up"}),  # the fused gate_up_proj
    "falcon": (T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100),
               {"attn.qkv", "attn.o", "ffn.up", "ffn.down"}, set()),  # FalconLinear, a Linear subclass
    "modernbert": (T.ModernBertConfig(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                      sep_token_id=2), {"attn.qkv", "attn.o", "ffn.up", "ffn.down"}, set()),
    "qwen2": (T.Qwen2Config(**SMALL, num_key_value_heads=2), ATTN | GATED, set()),
    "gemma": (T.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16), ATTN | GATED, set()),  # q wider than H
}
DECODERS = {"phi3", "falcon", "qwen2", "gemma"}


def _meta_model(config: T.PretrainedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return T.AutoModel.from_config(config)


def _table(out: str) -> list[dict[str, str]]:
    """The rows of `petlsearch graph`'s table: name, role, from, layer, ..."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 8 and cells[0] != "name":
            rows.append(dict(zip(("name", "role", "from", "layer", "type", "in", "out", "params"), cells)))
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_shows_every_attention_and_ffn_role_per_layer(family: str, tmp_path: Path, capsys) -> None:
    config, expected, structural = FAMILIES[family]
    config.save_pretrained(tmp_path)
    assert main(["graph", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    per_layer = collections.defaultdict(set)  # (stack, layer) -> roles
    for r in rows:
        if r["role"].startswith(("attn", "ffn.")) and r["layer"]:
            stack = r["name"].split(".")[0]
            per_layer[stack, int(r["layer"])].add(r["role"])
            assert r["name"] == f"{stack}.L{r['layer']}.{r['role']}" or r["role"] == "attn"
    graph = ModelGraph.from_model(_meta_model(config))
    blocks = sorted((b.stack, b.layer) for b in graph.blocks)
    assert blocks and sorted(per_layer) == blocks
    stacks = {stack for stack, _ in blocks}  # decoder-only models are decoders whatever their modules' names
    assert stacks == {"decoder"} if family in DECODERS else "encoder" in stacks
    for block in blocks:
        assert expected <= per_layer[block], (block, expected - per_layer[block])
    found = {r["role"] for r in rows if r["from"] == "structure"}
    assert found == structural
    assert ("from the model's structure" in out) == bool(structural)


def _rename_inside_blocks(model: torch.nn.Module, graph: ModelGraph) -> None:
    """Every module inside each block renamed m0, m1, ... in registration order (shapes only: the
    model no longer runs, its graph is what is read)."""
    def rename(module: torch.nn.Module) -> None:
        children = list(module._modules.items())
        module._modules = collections.OrderedDict((f"m{i}", child) for i, (_, child) in enumerate(children))
        for child in module._modules.values():
            if child is not None:
                rename(child)

    for block in graph.blocks:
        rename(model.get_submodule(block.path))


@pytest.mark.parametrize("family", ["deberta-v2", "funnel", "phi3", "falcon", "modernbert", "qwen2", "gemma"])
def test_renamed_modules_get_the_roles_their_names_gave(family: str) -> None:
    """q, k and v of equal shape are told apart by registration order (q, k, v in these families;
    BART and HuBERT register k, v, q, which only their names can tell)."""
    config = FAMILIES[family][0]
    named = _meta_model(config)
    graph = ModelGraph.from_model(named)
    expected = [(n.layer, n.role) for n in graph.nodes.values() if n.type in LINEAR_TYPES and n.layer is not None]
    renamed = _meta_model(config)
    _rename_inside_blocks(renamed, ModelGraph.from_model(renamed))
    blind = ModelGraph.from_model(renamed)
    got = [(n.layer, n.role) for n in blind.nodes.values() if n.type in LINEAR_TYPES and n.layer is not None]
    assert got == expected
    assert all(n.role_from == "structure" for n in blind.nodes.values() if n.type in LINEAR_TYPES and n.role
               and n.layer is not None)
