"""Hand a trained structure to the user's stack: merged weights, or a Hugging Face peft adapter.

- `export_merged` folds every mergeable placement (LoRA, BitFit, IA3, FISH, DSEE, KAdaptation, and
  any plugin whose modules can `merge`) into the backbone's weights and writes a plain Hugging Face
  model folder (config, safetensors, tokenizer, the trained task head) that
  `AutoModelForSequenceClassification.from_pretrained(folder)` loads without petlsearch, with the
  applied model's logits. A placement that cannot merge (adapters, prompts, side networks) is
  refused by name, unless `partial`: then the folder also holds `structure.yaml` and
  `weights.safetensors` of the rest, to apply on top of the merged model.
- peft can carry LoRA (per-module ranks through rank_pattern / alpha_pattern; with BitFit on exactly
  LoRA's modules, as bias="lora_only"), IA3 and prompt tuning; one adapter holds one of these types. `export_peft` writes `adapter_config.json` and
  `adapter_model.safetensors` that `PeftModel.from_pretrained` loads with identical outputs.
  Anything else is a StructureError listing the placements peft cannot carry.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petlsearch.errors import StructureError
from petlsearch.files import save_tensors, write_text
from petlsearch.plugins.registry import plugins_for
from petlsearch.searchspace.structure import Structure

if TYPE_CHECKING:
    import torch

    from petlsearch.runners.tasks import Task
    from petlsearch.searchspace.graph import ModelGraph

PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING"}


def _check_expressible(structure: Structure) -> str:
    bad = [p.key for p in structure.placements if p.plugin not in PEFT_TYPES and p.plugin != "bitfit"]
    if bad:
        raise StructureError(f"peft cannot express these placements: {bad}; only {sorted(PEFT_TYPES)} export "
                             "(and BitFit beside LoRA)")
    kinds = {p.plugin for p in structure.placements}
    if kinds == {"lora", "bitfit"}:
        lora = {p.site for p in structure.placements if p.plugin == "lora"}
        off = [p.key for p in structure.placements if p.plugin == "bitfit" and p.site not in lora]
        missing = sorted(lora - {p.site for p in structure.placements if p.plugin == "bitfit"})
        if off or missing:
            raise StructureError("peft's bias='lora_only' trains exactly the biases of LoRA's modules: "
                                 + (f"BitFit placements {off[:3]} are elsewhere" if off else
                                    f"LoRA's {missing[:3]} have no BitFit placement"))
        return "lora"
    if len(kinds) != 1 or kinds == {"bitfit"}:
        raise StructureError(f"a peft adapter holds one method, this structure has {sorted(kinds)}; export a "
                             "structure of LoRA (with BitFit on the same modules), IA3 or prompt tuning alone")
    return kinds.pop()


def peft_files(structure: Structure, graph: ModelGraph, state: dict[str, torch.Tensor],
               head: dict[str, torch.Tensor] | None = None, base_model: str | None = None,
               biases: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, adapter_model state) for `structure` with trained `state`
    (keys `<placement key>/<param>`, as Applied.state_dict()) and optional head weights. BitFit
    beside LoRA needs the backbone's own `biases` (module path -> bias): peft stores the trained
    bias itself, petlsearch the offset to it."""
    method = _check_expressible(structure)
    resolved = structure.resolve(graph, plugins_for(structure), force=True)
    head = head or {}
    config: dict[str, Any] = {"peft_type": PEFT_TYPES[method], "task_type": "SEQ_CLS" if head else None,
                              "base_model_name_or_path": base_model, "inference_mode": True}
    tensors: dict[str, torch.Tensor] = {}
    if method == "lora":
        offsets = {site.path: state[f"{p.key}/bias"] for p, (_, site, _) in resolved if p.plugin == "bitfit"}
        lora = [(p, site) for p, (_, site, _) in resolved if p.plugin == "lora"]
        ranks = {site.path: cfg["rank"] for p, (_, site, cfg) in resolved if p.plugin == "lora"}
        alphas = {site.path: cfg["alpha"] for p, (_, site, cfg) in resolved if p.plugin == "lora"}
        r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
        conv1d = {graph.node(site.path).type == "Conv1D" for _, site in lora}
        if len(conv1d) > 1:
            raise StructureError("peft's fan_in_fan_out is global: LoRA on Conv1D and Linear together cannot export")
        config.update(r=r, lora_alpha=alpha, target_modules=sorted(ranks), lora_dropout=0.0,
                      bias="lora_only" if offsets else "none", fan_in_fan_out=conv1d.pop(),
                      rank_pattern={k: v for k, v in ranks.items() if v != r},
                      alpha_pattern={k: v for k, v in alphas.items() if v != alpha})
        for p, site in lora:
            for ours, theirs in (("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight")):
                tensors[f"base_model.model.{site.path}.{theirs}"] = state[f"{p.key}/{ours}"]
        for path, offset in offsets.items():
            if biases is None or path not in biases:
                raise StructureError(f"exporting BitFit to peft needs the backbone's bias of {path}")
            tensors[f"base_model.model.{path}.base_layer.bias"] = biases[path] + offset
    elif method == "ia3":
        ff = sorted(site.path for _, (_, site, _) in resolved if site.get("where") == "input")
        config.update(target_modules=sorted(site.path for _, (_, site, _) in resolved), feedforward_modules=ff)
        for p, (_, site, _) in resolved:
            vec = state[f"{p.key}/ia3_l"]
            tensors[f"base_model.model.{site.path}.ia3_l"] = vec[None, :] if site.path in ff else vec[:, None]
    else:
        (p, (_, site, cfg)), = resolved
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
                out: str | Path | None = None, model: str | None = None, graph: ModelGraph | None = None,
                backbone: Any = None) -> Path:
    """Write a peft adapter folder next to the structure (or at `out`); `backbone` (the pretrained
    model, built from the structure's backbone name when not given) supplies BitFit's base biases."""
    from safetensors.torch import load_file

    _check_expressible(structure)  # fail before building anything
    structure_path = Path(structure_path)
    weights = _trained_weights(structure_path, weights)
    head_file = weights.with_name("head.safetensors")
    head = load_file(str(head_file)) if head_file.exists() else None
    if backbone is None and (graph is None or any(p.plugin == "bitfit" for p in structure.placements)):
        from petlsearch.runners.tasks import build_model

        backbone = build_model(model or structure.backbone.name)
    if graph is None:
        from petlsearch.searchspace.graph import ModelGraph

        graph = ModelGraph.from_model(backbone)
    biases = ({name.removesuffix(".bias"): p.detach() for name, p in backbone.named_parameters()
               if name.endswith(".bias")} if backbone is not None else None)
    config, tensors = peft_files(structure, graph, load_file(str(weights)), head, model or structure.backbone.name,
                                 biases)
    out = Path(out) if out else structure_path.with_name("peft_adapter")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "adapter_config.json", json.dumps(config, indent=2))
    save_tensors(out / "adapter_model.safetensors", tensors)
    return out


def export_merged(structure: Structure, structure_path: str | Path, task: Task, weights: str | Path | None = None,
                  out: str | Path | None = None, partial: bool = False) -> Path:
    """Write the structure merged into `task`'s backbone as a Hugging Face model folder (see the
    module docstring). The backbone is built as the structure's final training built it (same seed
    and batch size: a data-driven plugin finds the same mask), then the trained weights and head load."""
    from safetensors.torch import load_file

    from petlsearch.runners.trial import fresh_backbone

    structure_path = Path(structure_path)
    plugins = plugins_for(structure)
    merged = [p for p in structure.placements if plugins[p.plugin].mergeable]
    rest = [p for p in structure.placements if not plugins[p.plugin].mergeable]
    if rest and not partial:
        raise StructureError(f"these placements cannot merge into the weights: {[p.key for p in rest]}; pass "
                             "--partial to write the merged part and a structure file of the rest")
    weights = _trained_weights(structure_path, weights)
    state = load_file(str(weights))
    seed, batch = int(structure.result.get("seed", 0)), int(structure.train.get("batch_size", 16))
    net, _, applied, _ = fresh_backbone(task, merged, plugins, seed, batch)
    if not hasattr(net, "save_pretrained"):
        raise StructureError(f"a merged export writes a Hugging Face model folder; {task.model_name} is not a "
                             "transformers model (keep the structure and its weights instead)")
    applied.load_state_dict(state)  # each placement takes its own `<key>/...` entries
    _load_head(net, weights.with_name("head.safetensors"))
    applied.merge()
    out = Path(out) if out else structure_path.with_name("merged")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one file, not a download: no bar
    try:
        net.save_pretrained(out)
    finally:
        hf_logging.enable_progress_bar()
    if task.tokenizer is not None:
        task.tokenizer.save_pretrained(out)
    if rest:
        prefixes = tuple(f"{p.key}/" for p in rest)
        Structure(structure.backbone, rest, structure.budget, {}, train=structure.train).save(out / "structure.yaml")
        save_tensors(out / "weights.safetensors", {k: v for k, v in state.items() if k.startswith(prefixes)})
    return out


def _trained_weights(structure_path: Path, weights: str | Path | None) -> Path:
    """The trained weights file: `weights`, else weights.safetensors beside the structure."""
    path = Path(weights) if weights else structure_path.with_name("weights.safetensors")
    if not path.exists():
        raise StructureError(f"trained weights {path} not found; pass --weights (from `petlsearch train`)")
    return path


def _load_head(net: Any, path: Path) -> None:
    """The trained task head (head.safetensors, beside the weights) into `net`."""
    from safetensors.torch import load_file

    if not path.exists():
        raise StructureError(f"the trained head {path} is missing; a merged model needs it")
    head = load_file(str(path))
    own = net.state_dict()
    bad = [k for k, v in head.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise StructureError(f"head weights {bad[:3]} do not fit {type(net).__name__} (another task or label count?)")
    net.load_state_dict(head, strict=False)


def import_peft(folder: str | Path, graph: ModelGraph) -> tuple[Structure, dict[str, torch.Tensor]]:
    """A Structure and its weights (Applied.load_state_dict format) from a peft LoRA or IA3 folder."""
    from safetensors.torch import load_file

    from petlsearch.searchspace.structure import Backbone, Placement

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
