"""The real command line in a subprocess: start-up without torch, each subcommand, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def run(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "petlsearch.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=timeout)


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from petlsearch.cli import build_parser; build_parser().format_help(); "
            "import petlsearch, petlsearch.plugins; petlsearch.plugins.list_plugins(); "
            "heavy = [m for m in ('torch', 'transformers', 'optuna', 'ray') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV)
    out = run("--help")
    assert out.returncode == 0 and "search" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["search", "--budget", "lots"], "cannot read the budget 'lots'"),
    (["search", "--strategy", "randmo"], "did you mean 'random'"),
    (["search", "--plugins", "lroa"], "unknown plugin 'lroa'"),
    (["search", "--plugin", "no_such_module:Thing"], "cannot load plugin"),
    (["show", "missing.yaml"], "does not exist"),
    (["graph", "not-a-model-name"], "unknown model"),
    (["search", "--lr", "fast"], "cannot read the learning rate 'fast'"),
    (["search", "--device", "gpu0"], "unknown device 'gpu0'"),
    (["search", "--config", "no-such-run.yaml"], "cannot read the config file no-such-run.yaml"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path) -> None:
    out = run(*args, "--out", str(tmp_path / "o")) if args[0] == "search" else run(*args)
    assert out.returncode == 2, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.startswith("petlsearch: error")]
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_plugins_lists_every_method() -> None:
    out = run("plugins")
    assert out.returncode == 0, out.stderr
    for name in ("lora", "adapter", "bitfit", "ia3", "prompt_tuning", "prefix_tuning"):
        assert name in out.stdout


@pytest.mark.slow
def test_search_show_train_export_on_real_minilm(tmp_path) -> None:
    """The whole loop on the real packaged MiniLM with a small real CSV (a Rotten Tomatoes subset)."""
    from petlsearch.runners.data import rotten_tomatoes

    rt = rotten_tomatoes()
    csv = tmp_path / "reviews.csv"
    rows = [f'"{t.replace(chr(34), "")}",{y}' for t, y in zip(rt.x_train[:160], rt.y_train[:160])]
    csv.write_text("text,label\n" + "\n".join(rows))
    out = tmp_path / "run"
    res = run("search", "--task", f"csv:{csv}", "--budget", "0.1%", "--plugins", "lora", "--roles", "attn.q,attn.v",
              "--trials", "2", "--steps", "2", "--final-steps", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "best structure" in res.stderr and (out / "structure.yaml").exists()
    shown = run("show", str(out / "structure.yaml"))
    assert shown.returncode == 0 and "lora" in shown.stdout
    exported = run("export", str(out / "structure.yaml"), "--to", "peft", "--out", str(tmp_path / "peft"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    trained = run("train", str(out / "structure.yaml"), "--task", f"csv:{csv}", "--steps", "2")
    assert trained.returncode == 0, trained.stderr
    assert "test accuracy" in trained.stderr
    again = run("search", "--task", f"csv:{csv}", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr
    # run.yaml repeats the run: the same structure, trained the same way, the same test accuracy
    repeat = run("search", "--config", str(out / "run.yaml"), "--out", str(tmp_path / "repeat"))
    assert repeat.returncode == 0, repeat.stderr
    first, second = (yaml.safe_load((d / "structure.yaml").read_text()) for d in (out, tmp_path / "repeat"))
    assert first["placements"] == second["placements"] and first["train"] == second["train"]
    assert first["result"]["test"] == second["result"]["test"]


@pytest.mark.slow
def test_graph_of_minilm(tmp_path) -> None:
    out = run("graph", "minilm", "--png", str(tmp_path / "g.png"))
    assert out.returncode == 0, out.stderr
    assert "encoder.L5.attn.q" in out.stdout and "6 layers" in out.stdout
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_show_names_a_plugin_that_is_not_installed(tmp_path) -> None:
    """`show` checks the plugins as `train` does: a missing one is one line naming it and the way in."""
    from petlsearch.searchspace.structure import Backbone, Placement, Structure

    path = Structure(Backbone("tiny"), [Placement("encoder.L0.attn.q:weight", "vera", {"rank": 4})]).save(
        tmp_path / "s.yaml")
    for command in ("show", "train"):
        out = run(command, str(path))
        assert out.returncode == 2, out.stderr
        lines = [x for x in out.stderr.splitlines() if x.startswith("petlsearch: error")]
        assert len(lines) == 1 and "unknown plugin 'vera'" in lines[0] and "--plugin package.module:Class" in lines[0]


def test_a_memory_budget_is_echoed_in_the_users_unit() -> None:
    from petlsearch.searchspace.budget import Budget

    assert Budget.parse("0.1%", "1MB").bind(10**6).describe() == ("0.1% of the backbone = 1,000 parameters and 1MB of "
                                                            "training memory")
    assert "512MiB of training memory" in Budget.parse("512MiB").describe()
    assert Budget.from_dict({"memory": 3 * 2**29}).describe() == "1.5GiB of training memory"  # older files
