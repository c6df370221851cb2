"""scripts/gpu-check.sh in its dry mode (the CPU, tiny sizes): the script a GPU day will run works
today, its report has every section, and on a machine without CUDA its CUDA tests are reported as
skipped, never as passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from petlsearch.plugins import list_plugins

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_reports_every_section_and_every_plugin(tmp_path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check-quick.json").read_text())
    tests, steps, memory, peft = report["tables"]
    outcomes = {row[0]: row[1] for row in tests["rows"]}
    assert any("test_auto_device_trains" in name for name in outcomes)  # `-m cuda` selected the CUDA tests
    if not torch.cuda.is_available():
        assert set(outcomes.values()) == {"skipped"}
    assert {row[0] for row in steps["rows"]} == set(list_plugins())  # a row (or a skip) for every plugin
    assert all(row[5] in ("yes", "skipped") for row in steps["rows"]), [r for r in steps["rows"] if r[5] == "NO"]
    assert [row[0] for row in memory["rows"]][:2] == ["full fine-tuning", "lora"]
    assert all(isinstance(row[3], float) for row in memory["rows"][1:])  # a modelled figure beside each measured
    assert [row[0] for row in peft["rows"]] == ["lora", "ia3"] and all(row[4] > 0 for row in peft["rows"])
    assert "no figure here is a GPU's" in (tmp_path / "gpu-check-quick.md").read_text()


def test_without_cuda_the_full_mode_refuses_in_one_line(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the full mode runs")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr and "--dry" in proc.stderr
    assert "Traceback" not in proc.stderr
