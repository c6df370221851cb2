"""Export a structure to Hugging Face peft (and import one back).

peft can carry LoRA (per-module ranks through rank_pattern / alpha_pattern), IA3 and prompt tuning;
one adapter holds one of these types. `export_peft` writes `adapter_config.json` and
`adapter_model.safetensors` that `PeftModel.from_pretrained` loads with identical outputs.
Anything else is a StructureError listing the placements peft cannot carry.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petlsearch.errors import StructureError
from petlsearch.files import replacing, write_text

if TYPE_CHECKING:
    import torch

    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.structure import Structure

PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING"}


def _check_expressible(structure: Structure) -> str:
    bad = [p.key for p in structure.placements if p.plugin not in PEFT_TYPES]
    if bad:
        raise StructureError(f"peft cannot express these placements: {bad}; only {sorted(PEFT_TYPES)} export")
    kinds = {p.plugin for p in structure.placements}
    if len(kinds) != 1:
        raise StructureError(f"a peft adapter holds one method, this structure mixes {sorted(kinds)}; "
                             "export a structure of LoRA, IA3 or prompt tuning alone")
    return kinds.pop()


def peft_files(structure: Structure, graph: ModelGraph, state: dict[str, torch.Tensor],
               head: dict[str, torch.Tensor] | None = None, base_model: str | None = None
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, adapter_model state) for `structure` with trained `state`
    (keys `<placement key>/<param>`, as Applied.state_dict()) and optional head weights."""
    method = _check_expressible(structure)
    resolved = structure.resolve(graph, force=True)
    head = head or {}
    config: dict[str, Any] = {"peft_type": PEFT_TYPES[method], "task_type": "SEQ_CLS" if head else None,
                              "base_model_name_or_path": base_model, "inference_mode": True}
    tensors: dict[str, torch.Tensor] = {}
    if method == "lora":
        ranks = {site.path: cfg["rank"] for _, _, site, cfg in resolved}
        alphas = {site.path: cfg["alpha"] for _, _, site, cfg in resolved}
        r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
        conv1d = {graph.node(site.path).type == "Conv1D" for _, _, site, _ in resolved}
        if len(conv1d) > 1:
            raise StructureError("peft's fan_in_fan_out is global: LoRA on Conv1D and Linear together cannot export")
        config.update(r=r, lora_alpha=alpha, target_modules=sorted(ranks), lora_dropout=0.0, bias="none",
                      fan_in_fan_out=conv1d.pop(), rank_pattern={k: v for k, v in ranks.items() if v != r},
                      alpha_pattern={k: v for k, v in alphas.items() if v != alpha})
        for p, _, site, _ in resolved:
            for ours, theirs in (("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight")):
                tensors[f"base_model.model.{site.path}.{theirs}"] = state[f"{p.key}/{ours}"]
    elif method == "ia3":
        ff = sorted(site.path for _, _, site, _ in resolved if site.get("where") == "input")
        config.update(target_modules=sorted(site.path for _, _, site, _ in resolved), feedforward_modules=ff)
        for p, _, site, _ in resolved:
            vec = state[f"{p.key}/ia3_l"]
            tensors[f"base_model.model.{site.path}.ia3_l"] = vec[None, :] if site.path in ff else vec[:, None]
    else:
        (p, _, site, cfg), = resolved
        info = graph.info["stacks"].get(site.stack, {})
        config.update(num_virtual_tokens=cfg["length"], token_dim=site.in_features, num_transformer_submodules=1,
                      num_attention_heads=info.get("num_heads"), num_layers=info.get("layers"),
                      prompt_tuning_init="RANDOM")
        tensors["prompt_embeddings"] = state[f"{p.key}/prompt"]
    if head:
        config["modules_to_save"] = sorted({k.rsplit(".", 1)[0] for k in head})
        prefix = "base_model." if method == "prompt_tuning" else "base_model.model."  # peft's own layout
        tensors.update({f"{prefix}{k}": v for k, v in head.items()})
    return config, {k: v.contiguous() for k, v in tensors.items()}


def export_peft(structure: Structure, structure_path: str | Path, weights: str | Path | None = None,
                out: str | Path | None = None, model: str | None = None, graph: ModelGraph | None = None) -> Path:
    """Write a peft adapter folder next to the structure (or at `out`)."""
    from safetensors.torch import load_file, save_file

    _check_expressible(structure)  # fail before building anything
    structure_path = Path(structure_path)
    weights = Path(weights) if weights else structure_path.with_name("weights.safetensors")
    if not weights.exists():
        raise StructureError(f"trained weights {weights} not found; pass --weights (from `petlsearch train`)")
    head_file = weights.with_name("head.safetensors")
    head = load_file(str(head_file)) if head_file.exists() else None
    if graph is None:
        from petlsearch.runners.tasks import build_model
        from petlsearch.searchspace.graph import ModelGraph

        graph = ModelGraph.from_model(build_model(model or structure.backbone.name))
    config, tensors = peft_files(structure, graph, load_file(str(weights)), head, model or structure.backbone.name)
    out = Path(out) if out else structure_path.with_name("peft_adapter")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "adapter_config.json", json.dumps(config, indent=2))
    with replacing(out / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    return out


def import_peft(folder: str | Path, graph: ModelGraph) -> tuple[Structure, dict[str, torch.Tensor]]:
    """A Structure and its weights (Applied.load_state_dict format) from a peft LoRA or IA3 folder."""
    from safetensors.torch import load_file

    from petlsearch.searchspace.structure import Backbone, Placement, Structure

    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError) as exc:
        raise StructureError(f"{folder}: not a peft adapter folder ({exc})") from None
    kind = config.get("peft_type")
    by_path = {n.path: n for n in graph.nodes.values()}
    placements, state = [], {}
    prefix = "base_model.model."
    for key, value in tensors.items():
        if not key.startswith(prefix) or (kind == "LORA" and ".lora_" not in key):
            continue
        path, _, param = key[len(prefix):].rpartition(".lora_") if kind == "LORA" else key[len(prefix):].rpartition(".")
        if path not in by_path:
            continue  # head weights (modules_to_save) are not placements
        node = by_path[path]
        if kind == "LORA":
            site, plugin = f"{node.name}:weight", "lora"
            rank = config.get("rank_pattern", {}).get(path, config["r"])
            alpha = config.get("alpha_pattern", {}).get(path, config["lora_alpha"])
            cfg = {"rank": rank, "alpha": alpha, "dropout": 0.0}
            state[f"{site}@lora/lora_{param.split('.')[0]}"] = value
        elif kind == "IA3":
            site, plugin, cfg = f"{node.name}:scale", "ia3", {}
            state[f"{site}@ia3/ia3_l"] = value.flatten()
        else:
            raise StructureError(f"{folder}: importing peft type {kind} is not supported (LORA, IA3 are)")
        if not any(p.site == site for p in placements):
            placements.append(Placement(site, plugin, cfg, node.role or "", node.layer))
    return Structure(Backbone.of(graph), placements), state
