"""Parity with Hugging Face peft: same trainable counts, same outputs with the same weights, and
export / import of structure files as peft adapter folders."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from petlsearch.errors import StructureError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins import create_plugins, plugins_for
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.space import SearchSpace
from petlsearch.searchspace.structure import Structure

peft = pytest.importorskip("peft")


def _trained(model, structure: Structure, seed: int = 0):
    applied = structure.apply(model, plugins_for(structure))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in applied.modules:
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.classifier.weight.add_(0.3 * torch.randn(model.classifier.weight.shape, generator=g))
    return applied


def _space(plugin: str, roles: tuple[str, ...]) -> tuple[SearchSpace, ModelGraph]:
    graph = ModelGraph.from_model(tiny.bert())
    return SearchSpace.from_graph(graph, create_plugins([plugin]), roles=roles), graph


def _export_and_load(tmp_path, structure, applied, model, base):
    from peft import PeftModel

    from petlsearch.runners.export import export_peft

    applied.save_weights(tmp_path / "weights.safetensors")
    from safetensors.torch import save_file

    save_file({f"classifier.{k}": v.contiguous() for k, v in model.classifier.state_dict().items()},
              str(tmp_path / "head.safetensors"))
    structure.save(tmp_path / "structure.yaml")
    folder = export_peft(structure, tmp_path / "structure.yaml", backbone=base)
    return PeftModel.from_pretrained(base, str(folder)).eval(), folder


def test_lora_counts_and_outputs_match_peft(tmp_path) -> None:
    space, graph = _space("lora", ("attn.q", "attn.v"))
    ranks = {"encoder.L0.attn.q:weight": 2}
    placements = [c.placement({"rank": ranks.get(c.site.key, 4), "alpha": 8, "dropout": 0.0}) for c in space.candidates]
    structure = space.structure(placements)
    ref = peft.get_peft_model(tiny.bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                              target_modules=["query", "value"],
                              rank_pattern={"bert.encoder.layer.0.attention.self.query": 2}))
    peft_count = sum(p.numel() for n, p in ref.named_parameters() if p.requires_grad and "lora_" in n)
    assert space.count(placements) == peft_count

    model = tiny.bert()
    applied = _trained(model, structure)
    x = tiny.inputs("bert")
    with torch.no_grad():
        ours = model(**x).logits
    loaded, folder = _export_and_load(tmp_path, structure, applied, model, tiny.bert())
    with torch.no_grad():
        theirs = loaded(**x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (folder / "adapter_config.json").exists()


def test_ia3_counts_and_outputs_match_peft(tmp_path) -> None:
    space, graph = _space("ia3", ("attn.k", "attn.v", "ffn.down"))
    placements = [c.placement({}) for c in space.candidates]
    structure = space.structure(placements)
    paths = [c.site.path for c in space.candidates]
    ff = [c.site.path for c in space.candidates if c.site.role == "ffn.down"]
    ref = peft.get_peft_model(tiny.bert(), peft.IA3Config(task_type="SEQ_CLS", target_modules=paths,
                                                          feedforward_modules=ff))
    peft_count = sum(p.numel() for n, p in ref.named_parameters() if p.requires_grad and "ia3_" in n)
    assert space.count(placements) == peft_count
    model = tiny.bert()
    applied = _trained(model, structure)
    x = tiny.inputs("bert")
    with torch.no_grad():
        ours = model(**x).logits
    loaded, _ = _export_and_load(tmp_path, structure, applied, model, tiny.bert())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, ours, atol=1e-5, rtol=1e-5)


def test_prompt_tuning_export_loads_in_peft(tmp_path) -> None:
    space = SearchSpace.from_graph(ModelGraph.from_model(tiny.bert()), create_plugins(["prompt_tuning"]))
    placements = [c.placement({"length": 4, "init": "random"}) for c in space.candidates]
    structure = space.structure(placements)
    model = tiny.bert()
    applied = _trained(model, structure)
    x = tiny.inputs("bert")
    with torch.no_grad():
        ours = model(**x).logits
    loaded, _ = _export_and_load(tmp_path, structure, applied, model, tiny.bert())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, ours, atol=1e-5, rtol=1e-5)


def test_inexpressible_structures_are_refused(tmp_path) -> None:
    from petlsearch.runners.export import export_peft

    space, _ = _space("adapter", ("attn", "ffn"))
    structure = space.structure([c.placement(space.plugins["adapter"].config(c.site)) for c in space.candidates[:2]])
    structure.save(tmp_path / "s.yaml")
    with pytest.raises(StructureError, match="peft cannot express.*adapter"):
        export_peft(structure, tmp_path / "s.yaml")


def test_import_peft_roundtrip(tmp_path) -> None:
    from petlsearch.runners.export import import_peft

    space, graph = _space("lora", ("attn.q", "attn.v"))
    placements = [c.placement({"rank": 3, "alpha": 6, "dropout": 0.0}) for c in space.candidates]
    structure = space.structure(placements)
    model = tiny.bert()
    applied = _trained(model, structure)
    base = tiny.bert()
    base.classifier.load_state_dict(model.classifier.state_dict())
    _, folder = _export_and_load(tmp_path, structure, applied, model, copy.deepcopy(base))
    imported, state = import_peft(folder, graph)
    assert sorted(p.key for p in imported.placements) == sorted(p.key for p in structure.placements)
    fresh = copy.deepcopy(base)
    imported.apply(fresh, plugins_for(imported)).load_state_dict(state)
    x = tiny.inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, model(**x).logits)


def test_lora_with_bitfit_on_its_modules_exports_as_lora_only_bias(tmp_path) -> None:
    graph = ModelGraph.from_model(tiny.bert())
    space = SearchSpace.from_graph(graph, create_plugins(["lora", "bitfit"]), roles=("attn.q", "attn.v"))
    placements = [c.placement({"rank": 2, "alpha": 4, "dropout": 0.0} if c.plugin == "lora" else {})
                  for c in space.candidates]
    assert {p.plugin for p in placements} == {"lora", "bitfit"}
    structure = space.structure(placements)
    model = tiny.bert()
    applied = _trained(model, structure)
    x = tiny.inputs("bert")
    with torch.no_grad():
        ours = model(**x).logits
    loaded, folder = _export_and_load(tmp_path, structure, applied, model, tiny.bert())
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only"
    with torch.no_grad():
        theirs = loaded(**x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(theirs, tiny.bert()(**x).logits)  # the adapter changed something


def test_bitfit_elsewhere_than_loras_modules_is_refused_by_name(tmp_path) -> None:
    from petlsearch.errors import StructureError
    from petlsearch.runners.export import export_peft

    graph = ModelGraph.from_model(tiny.bert())
    space = SearchSpace.from_graph(graph, create_plugins(["lora", "bitfit"]), roles=("attn.q", "ffn.up"))
    placements = [c.placement(space.plugins[c.plugin].config(c.site)) for c in space.candidates
                  if (c.plugin == "lora") == (c.site.role == "attn.q")]  # LoRA on q, BitFit on the FFN
    structure = space.structure(placements)
    structure.save(tmp_path / "structure.yaml")
    with pytest.raises(StructureError, match=r"bias='lora_only'.*BitFit placements \['encoder\.L0\.ffn\.up"):
        export_peft(structure, tmp_path / "structure.yaml", backbone=tiny.bert())
