"""Memory: training memory of every plugin, measured and modelled, and the memory-lean methods
(LST, VQT) against full fine-tuning and LoRA.

For every registered plugin at its default size (all of its sites, default config) on MiniLM
(all-MiniLM-L6-v2's config), T5-base and ViT-B/16 (configs, random weights): the trainable parameters,
the memory of one training step measured by petlsearch.searchspace.measure.measure (CPU: the
bytes autograd keeps, weights, gradients, AdamW state) and modelled by .estimate, and the model's
error (target: within 15%, on the total and on the activations alone, so that the frozen weights
cannot hide an error). Full fine-tuning is measured beside them. Then LST's training memory on
T5-base at batch 16 x 128 tokens as a share of full fine-tuning's (target <= 35%) and of LoRA's
(target <= 60%), as in the LST paper's Table 1 setting: measured at batch 1 and 2 and extrapolated
linearly in the batch (autograd keeps activations per example). Likewise VQT's on ViT-B/16 at
batch 16 x 197 tokens (224 x 224 images, measured at batch 2 and 4) against LoRA's (target <=
60%, LST's bar: VQT's queries read each layer without changing it, so backward never crosses the
backbone).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from bench import methods as M
from bench.common import Options, Report, Table, Target, median, mib

log = logging.getLogger(__name__)
NAME = "memory"
TITLE = "Memory: training memory per plugin, measured vs modelled"
LST_SHAPE = (16, 128)
VQT_BATCH = 16  # at the ViT's own token count (ViT-B/16 at 224 x 224: 196 patches and the class token)
MEASURED = (1, 2)  # batch sizes measured, extrapolated to the shapes above
# VQT keeps so little per example that batch 1's extra storages (autograd keeps some at batch 1
# that it does not at 2: VQT on ViT-B keeps 14.6 MB at batch 1, 14.6 at 2, 29.2 at 4) flatten the
# slope: its comparison reads batches 2 and 4
VQT_MEASURED = (2, 4)
# on T5-base one step of full fine-tuning takes minutes on a shared 2-core CPU: the per-plugin table
# there covers LoRA, adapters, IA3, prefix tuning and LST
T5_PLUGINS = ("lora", "adapter", "ia3", "prefix_tuning", "lst")


def models(quick: bool) -> dict[str, tuple[nn.Module, tuple[int, int]]]:
    """name -> (model with random weights, (batch, seq) of the per-plugin table)."""
    from transformers import (
        AutoConfig,
        BertConfig,
        BertForSequenceClassification,
        T5Config,
        T5ForConditionalGeneration,
        ViTConfig,
        ViTForImageClassification,
    )

    from petlsearch.runners import data as D

    torch.manual_seed(0)
    if quick:
        bert = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=256, num_labels=2)
        t5 = T5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)
        vit = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, num_labels=2)
        return {"tiny BERT": (BertForSequenceClassification(bert), (4, 32)),
                "tiny T5": (T5ForConditionalGeneration(t5), (4, 32)),
                "tiny ViT": (ViTForImageClassification(vit), (4, 17))}
    minilm = AutoConfig.from_pretrained(D.minilm_path(), num_labels=2)
    t5 = T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64)  # T5-base
    vit = ViTConfig(num_labels=10)  # ViT-B/16 at 224 x 224
    return {"all-MiniLM-L6-v2": (BertForSequenceClassification(minilm), (16, 64)),
            "T5-base": (T5ForConditionalGeneration(t5), (2, 64)),
            "ViT-B/16": (ViTForImageClassification(vit), (2, 197))}


def make_batch(model: nn.Module, batch: int, seq: int) -> dict[str, Any]:
    """Random tokens or images (memory does not depend on their values), with labels for the
    model's loss; an image model's `seq` is set by its config (patches + class token)."""
    g = torch.Generator().manual_seed(0)
    config = model.config
    if getattr(config, "image_size", None):
        size = config.image_size
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=g),
                "labels": torch.randint(0, config.num_labels, (batch,), generator=g)}
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        out.update(decoder_input_ids=ids.flip(1), labels=ids)
    else:
        out["labels"] = torch.randint(0, model.config.num_labels, (batch,), generator=g)
    return out


def plugin_row(base: nn.Module, name: str, batch: dict[str, Any], shape: Any, device: str = "cpu") -> dict[str, Any]:
    """Measured and estimated memory of plugin `name` at every site of `base` (head frozen), on
    the device `base` and `batch` are on (`device`: its type, which the memory model reads)."""
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.measure import measure
    from petlsearch.searchspace.memory import estimate

    model = copy.deepcopy(base)
    graph = ModelGraph.from_model(model)
    prep = M.apply_plugin(model, name, batches=[batch], graph=graph)
    for p in prep.head:  # the head is counted apart from a structure: measure the method alone
        p.requires_grad_(False)
    params = [p for p in M._unique(prep.params) if p.requires_grad]
    if not params:  # training-free (Tip-Adapter): nothing to step
        return {"plugin": name, "params": 0, "sites": len(prep.placements), "error": "no trainable parameters"}
    measured = measure(model, batch, params)
    est = estimate(graph, prep.placements, shape, device=device)
    return {"plugin": name, "params": prep.trainable, "sites": len(prep.placements), "measured": measured.total,
            "estimated": est.total, "act_measured": measured.activations, "act_estimated": est.activations,
            "error": (est.total - measured.total) / measured.total,
            "act_error": (est.activations - measured.activations) / max(1, measured.activations)}


def full_ft(base: nn.Module, batch: dict[str, Any]) -> int:
    from petlsearch.searchspace.measure import measure

    model = copy.deepcopy(base)
    return measure(model, batch, list(M.full_finetuning(model).model.parameters())).total


def per_plugin(label: str, base: nn.Module, bs: tuple[int, int], plugins: list[str]) -> tuple[Table, list[dict]]:
    from petlsearch.searchspace.memory import BatchShape

    batch, shape = make_batch(base, *bs), BatchShape(*bs)
    table = Table(f"{label}, batch {bs[0]} x {bs[1]} tokens (one training step, AdamW, fp32, CPU)",
                  ["method", "sites", "trainable", "measured MiB", "estimated MiB", "error", "activations MiB",
                   "activation error", "/ full FT"])
    full = full_ft(base, batch)
    n_all = sum(p.numel() for p in base.parameters())
    table.add("full fine-tuning", "", n_all, mib(full), "", "", "", "", 1.0)
    rows = []
    for name in plugins:
        try:
            r = plugin_row(base, name, batch, shape)
        except Exception as exc:  # a plugin without sites here, or one that fails, is listed
            r = {"plugin": name, "error": f"{type(exc).__name__}: {str(exc)[:80]}"}
        if "measured" not in r:
            log.info("memory: %s on %s: %s", name, label, r["error"])
            continue
        rows.append(r)
        table.add(name, r["sites"], r["params"], mib(r["measured"]), mib(r["estimated"]), f"{r['error']:+.1%}",
                  mib(r["act_measured"]), f"{r['act_error']:+.1%}", r["measured"] / full)
    return table, rows


def _at_batch(rows: dict[int, int], batch: int) -> float:
    """Memory at `batch`, extrapolated linearly from two measured batch sizes: what autograd keeps
    is per example (T5's position bias, shared by the batch, is in the intercept)."""
    (b1, m1), (b2, m2) = sorted(rows.items())
    per_example = (m2 - m1) / (b2 - b1)
    return m1 + per_example * (batch - b1)


def lean_ratios(label: str, base: nn.Module, method: str, shape: tuple[int, int], report: Report,
                full_target: float | None, sizes: tuple[int, int] = MEASURED) -> None:
    """`method` / full fine-tuning and / LoRA on `label` at `shape`: measured at batch `sizes` (one
    full fine-tuning step of T5-base at batch 16 needs ~14 GB and many minutes here) and
    extrapolated. Targets: <= 60% of LoRA's, and <= `full_target` % of full fine-tuning's."""
    from petlsearch.plugins import list_plugins
    from petlsearch.searchspace.memory import BatchShape

    if method not in list_plugins():
        report.notes.append(f"The {method} plugin is not registered: no {method} ratios.")
        return
    batch, seq = shape
    measured: dict[str, dict[int, int]] = {"full fine-tuning": {}, "lora": {}, method: {}}
    for b in sizes:
        data = make_batch(base, b, seq)
        measured["full fine-tuning"][b] = full_ft(base, data)
        for name in ("lora", method):
            measured[name][b] = plugin_row(base, name, data, BatchShape(b, seq))["measured"]
    estimated = {name: plugin_row_estimate(base, name, BatchShape(batch, seq)) for name in ("lora", method)}
    at = {k: _at_batch(v, batch) for k, v in measured.items()}
    upper = method.upper()
    table = Table(f"{upper} on {label} at batch {batch} x {seq} tokens (measured at batch "
                  f"{' and '.join(map(str, sizes))}, extrapolated linearly in the batch)",
                  ["method", *(f"MiB at batch {b}" for b in sizes), f"MiB at batch {batch}",
                   f"estimated MiB at {batch}", "/ full FT", f"{upper} / this"])
    for name, rows in measured.items():
        table.add(name, *(mib(rows[b]) for b in sizes), mib(at[name]),
                  mib(estimated[name]) if name in estimated else "", at[name] / at["full fine-tuning"],
                  at[method] / at[name])
    report.tables.append(table)
    if full_target is not None:
        report.targets.append(Target(f"{upper} / full fine-tuning ({label}, {batch} x {seq})",
                                     100 * at[method] / at["full fine-tuning"], full_target, unit="%"))
    report.targets.append(Target(f"{upper} / LoRA ({label}, {batch} x {seq})", 100 * at[method] / at["lora"], 60,
                                 unit="%"))
    report.data[method] = {"model": label, "measured": measured, "extrapolated": at, "estimated": estimated}


def plugin_row_estimate(base: nn.Module, name: str, shape: Any) -> float:
    """The memory model's figure for plugin `name` at every site, without running the model."""
    from petlsearch.plugins import create_plugin
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.memory import estimate

    graph = ModelGraph.from_model(base)
    plugin = create_plugin(name)
    return estimate(graph, [(plugin, s, plugin.config(s)) for s in plugin.sites(graph)], shape).total


def run(opts: Options) -> Report:
    from petlsearch.plugins import list_plugins

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    plugins = ["lora", "ia3", "lst"] if opts.quick else list_plugins()
    plugins = [p for p in plugins if p in list_plugins()]
    errors = []
    for label, (base, bs) in models(opts.quick).items():
        for p in base.parameters():
            p.requires_grad_(False)
        here = [p for p in plugins if label != "T5-base" or p in T5_PLUGINS]
        table, rows = per_plugin(label, base, bs, here)
        report.tables.append(table)
        report.data[label] = rows
        errors += [abs(r["error"]) for r in rows]
        if "T5" in label:
            lean_ratios(label, base, "lst", LST_SHAPE, report, full_target=35)
        if "ViT" in label:
            lean_ratios(label, base, "vqt", (VQT_BATCH, bs[1]), report, full_target=None, sizes=VQT_MEASURED)
    worst = max(errors, default=float("nan"))
    report.targets.insert(0, Target("memory model, worst |error| over plugins and models", 100 * worst, 15, unit="%"))
    report.targets.insert(1, Target("memory model, median |error|", 100 * median(errors), 15, unit="%"))
    report.notes += ["Weights are random (built from the configs): memory does not depend on their values.",
                     "A plugin without sites on a model, or without trainable parameters (Tip-Adapter's "
                     "training-free cache), has no row there.",
                     "The task head is frozen in these measurements: a structure's budget counts it apart."]
    if opts.quick:
        report.notes.append("Quick mode: tiny BERT, T5 and ViT configs; the LST and VQT ratios are the tiny models', "
                            "not T5-base's and ViT-B's.")
    return report
