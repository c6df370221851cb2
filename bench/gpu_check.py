"""GPU check: what a CUDA machine shows about petlsearch, in one report, without any download.

Run by `scripts/gpu-check.sh` (`python -m bench.gpu_check`) on the day a GPU is lent; every model
is built from a config with random weights, so nothing is fetched.

1. The CUDA-marked tests (`pytest -m cuda`): `device="auto"` picks the GPU and trains in bf16
   autocast, S3PET's supernet and a search run there, the allocator-based memory measurement.
2. A bf16 training step of every plugin on the tiny model of each family it has sites on (BERT,
   GPT-2, T5, Llama, ViT, CLIP; the conformance kit's), at every site with its default config,
   under the autocast the trainer uses: the loss and every gradient are finite and the trained
   tensors move.
3. The memory model against the allocator: `estimate(device="cuda")` beside
   `measure` (`torch.cuda.max_memory_allocated` over one fp32 AdamW step) for the main plugins
   on BERT-base's config at batch 16 x 128 tokens, and full fine-tuning's step beside them.
4. Our LoRA (q, v) and IA3 training step against Hugging Face peft's on the same modules of
   BERT-base's config at batch 32 x 128, bf16 autocast, the two interleaved in one process: the
   median of the per-round time ratios (the CPU overhead benchmark's target is <= 1.05).

`--dry` runs the same code on the CPU at tiny sizes (what the test suite runs, so that the script
works the day a GPU comes): its CUDA tests are reported as skipped, and its figures say nothing
about a GPU. The script exits non-zero when a test or a plugin's step fails.
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, Report, Table, Target, median, mib
from bench.memory import full_ft, make_batch, plugin_row

log = logging.getLogger(__name__)
NAME = "gpu-check"
TITLE = "GPU check: CUDA tests, a bf16 step per plugin, the memory model, the step against peft"
MEMORY_PLUGINS = ("lora", "adapter", "bitfit", "ia3", "lst", "prompt_tuning", "prefix_tuning")
STEPS = 3  # bf16 steps per plugin: the first moves LoRA's B, the second its A too
ROOT = Path(__file__).resolve().parents[1]


def cuda_tests(out: Path) -> tuple[Table, int]:
    """Run `pytest -m cuda`; its counts as a table, and the number that failed."""
    xml = out / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    table = Table("CUDA-marked tests (`pytest -m cuda tests`)", ["test", "outcome", "seconds", "detail"])
    if not xml.exists():
        table.add("(pytest did not run)", "error", "", _last_line(proc.stderr))
        return table, 1
    failed = 0
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, detail = ("skipped" if kind == "skipped" else "failed"), (node.get("message") or "")[:120]
        failed += outcome == "failed"
        table.add(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}", outcome,
                  float(case.get("time", 0.0)), detail)
    if proc.returncode not in (0, 5) and not failed:  # 5: nothing collected
        failed = 1
        table.add("(pytest)", f"exit {proc.returncode}", "", _last_line(proc.stdout))
    return table, failed


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def plugin_step(name: str, family: str, device: torch.device, amp: bool) -> dict[str, Any] | None:
    """STEPS AdamW steps of plugin `name` at every site of the tiny `family` model under bf16
    autocast; None where the plugin has no site on the family."""
    from petlsearch.plugins import create_plugin
    from petlsearch.runtime import to_device
    from petlsearch.searchspace.measure import step_loss
    from petlsearch.testing import frozen_tiny, tiny_batch

    plugin = create_plugin(name)
    model, graph = frozen_tiny(family)
    sites = plugin.sites(graph)
    if not sites:
        return None
    batch = tiny_batch(model, family)
    if plugin.needs_data:
        plugin.prepare(model, [batch])
    model.to(device).train()
    batch = to_device(batch, device)
    for site in sites:
        plugin.attach(model, site, plugin.config(site))
    params = [p for p in model.parameters() if p.requires_grad]
    row: dict[str, Any] = {"plugin": name, "family": family, "sites": len(sites),
                           "trainable": sum(p.numel() for p in params)}
    if not params:  # training-free (Tip-Adapter): its forward under autocast is the check
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = step_loss(model(**batch))
        return {**row, "ok": bool(torch.isfinite(out)), "detail": "training-free: forward only", "ms": float("nan")}
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    times, losses = [], []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = step_loss(model(**batch))
        loss.backward()
        bad = [i for i, p in enumerate(params) if p.grad is not None and not torch.isfinite(p.grad).all()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if bad or not math.isfinite(losses[-1]):
            return {**row, "ok": False, "detail": f"loss {losses[-1]:.3g}, {len(bad)} non-finite gradients",
                    "ms": 1e3 * median(times)}
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    ok = moved > 0 and all(torch.isfinite(p).all() for p in params)
    return {**row, "ok": ok, "detail": f"loss {losses[0]:.3g} -> {losses[-1]:.3g}; {moved}/{len(params)} tensors moved",
            "ms": 1e3 * median(times[1:])}


def plugin_steps(device: torch.device, amp: bool) -> tuple[Table, int]:
    from petlsearch.plugins import list_plugins
    from petlsearch.plugins.testing import FAMILIES

    precision = "bf16 autocast" if amp else "fp32 (no bf16 on this device)"
    table = Table(f"A training step of every plugin at every site of the tiny models ({precision}, {device.type})",
                  ["plugin", "family", "sites", "trainable", "ms / step", "ok", "detail"])
    failed = 0
    for name in list_plugins():
        rows = 0
        for family in FAMILIES:
            try:
                row = plugin_step(name, family, device, amp)
            except Exception as exc:  # noqa: BLE001 - a failing plugin is a row of the report
                row = {"plugin": name, "family": family, "sites": "", "trainable": "", "ms": float("nan"),
                       "ok": False, "detail": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:100]}"}
            if row is None:
                continue
            rows += 1
            failed += not row["ok"]
            table.add(name, family, row["sites"], row["trainable"], row["ms"], "yes" if row["ok"] else "NO", row["detail"])
        if not rows:
            table.add(name, "", 0, "", "", "skipped", "no site on any tiny family")
    return table, failed


def bert(dry: bool, device: torch.device) -> tuple[str, torch.nn.Module]:
    """(label, model): BERT-base's config with random weights (dry: a 2-layer, 64-wide BERT)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if dry:
        config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=256, num_labels=2)
        return "tiny BERT", BertForSequenceClassification(config).to(device)
    return "BERT-base (config)", BertForSequenceClassification(BertConfig(num_labels=2)).to(device)


def memory_rows(device: torch.device, dry: bool) -> Table:
    """The memory model against the measured step, on `device`."""
    from petlsearch.runtime import to_device
    from petlsearch.searchspace.memory import BatchShape

    label, base = bert(dry, device)
    bs = (4, 32) if dry else (16, 128)
    batch, shape = to_device(make_batch(base, *bs), device), BatchShape(*bs)
    table = Table(f"{label}, batch {bs[0]} x {bs[1]}: one fp32 AdamW step, "
                  f"{device.type}", ["method", "trainable", "measured MiB", "modelled MiB", "error", "/ full FT"])
    full = full_ft(base, batch)
    table.add("full fine-tuning", sum(p.numel() for p in base.parameters()), mib(full), "", "", 1.0)
    for name in MEMORY_PLUGINS:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            r = plugin_row(base, name, batch, shape, device=device.type)
        except Exception as exc:  # noqa: BLE001 - listed, as the CPU memory benchmark lists them
            table.add(name, "", "", "", f"{type(exc).__name__}: {str(exc)[:80]}", "")
            continue
        table.add(name, r["params"], mib(r["measured"]), mib(r["estimated"]), f"{r['error']:+.1%}", r["measured"] / full)
    return table


def peft_ratios(device: torch.device, amp: bool, dry: bool) -> tuple[Table, list[Target]]:
    """petlsearch / peft training step time for LoRA (q, v) and IA3 (the overhead benchmark's
    comparison, on `device`), and its targets."""
    from bench.overhead import step_ratios
    from petlsearch.runtime import to_device

    label, base = bert(dry, device)
    bs, rounds, inner = ((4, 32), 3, 2) if dry else ((32, 128), 15, 5)
    batch = to_device(make_batch(base, *bs), device)
    table = Table(f"Training step, petlsearch vs peft (LoRA on q, v; IA3), {label} at batch {bs[0]} x {bs[1]}, "
                  f"{'bf16 autocast' if amp else 'fp32'}, {device.type}",
                  ["method", "trainable", "petlsearch ms", "peft ms", "ratio (median)", "+-", "rounds"])
    ratios = step_ratios(base, batch, rounds, inner, table, amp=amp)
    return table, [Target(f"{kind} step / peft's ({device.type})", ratio, 1.05) for kind, ratio in ratios.items()]


def run(out: Path, dry: bool) -> tuple[Report, int]:
    from petlsearch.runtime import pick_device

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), dry,
                    command=f"scripts/gpu-check.sh{' --dry' if dry else ''}")
    device = torch.device("cpu") if dry else pick_device("auto")
    if device.type != "cuda" and not dry:
        raise SystemExit("gpu-check: no CUDA device here; run `scripts/gpu-check.sh --dry` to check the script on CPU")
    amp = device.type == "cpu" or torch.cuda.is_bf16_supported()  # CPU autocast has bf16 too
    start = time.perf_counter()
    tests, failed_tests = cuda_tests(out)
    steps, failed_steps = plugin_steps(device, amp)
    peft, targets = peft_ratios(device, amp, dry)
    report.tables += [tests, steps, memory_rows(device, dry), peft]
    report.targets += targets
    if dry:
        report.notes.append("Dry mode: the CPU at tiny sizes, to check the script; no figure here is a GPU's.")
    report.notes.append(f"{failed_tests} CUDA test(s) and {failed_steps} plugin step(s) failed.")
    report.seconds = time.perf_counter() - start
    return report, failed_tests + failed_steps


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="on the CPU at tiny sizes: checks the script, not a GPU")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the report (default: bench/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report, failed = run(args.out, args.dry)
    md, _ = report.write(args.out)
    print(report.markdown())
    log.info("report: %s", md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
