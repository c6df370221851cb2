"""The README's commands work: every `petlsearch ...` line of its shell blocks, and its Python blocks,
run as a user would type them, in smoke mode (PETLSEARCH_SMOKE=1: token compute, see
petlsearch/smoke.py) in a scratch folder holding the small CSV file the examples name. A command
that fails or prints a traceback fails its test. The README stays the user's text: this test reads
it and never writes it. Commands that cannot run here are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
# what this machine cannot do, by a pattern of the command
CANNOT_RUN = {
    r"^make ": "a make target builds the environment this test runs in (make test runs this file)",
    r"--address ray://": "needs a running Ray cluster at that address (docs/ray_cluster.md)",
}
TIMEOUT = 600

pytestmark = pytest.mark.slow


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def commands(text: str) -> list[str]:
    """The shell commands of the README, in order: lines of bash blocks, `$ ` lines of console blocks,
    without their trailing comments."""
    out = []
    for lang, body in blocks(text):
        for line in body.splitlines():
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            elif lang != "bash":
                continue
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def python_source(text: str) -> str:
    """Every Python block, in order, as one script (later blocks use what earlier ones defined)."""
    return "\n\n".join(body for lang, body in blocks(text) if lang == "python")


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in CANNOT_RUN.items() if re.search(pattern, command)), None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder with the file the examples name: reviews.csv (real snippets, columns
    review and stars as in the README's csv example)."""
    import csv

    from petlsearch.runners import data as D

    splits = D.rotten_tomatoes(0)
    path = tmp_path_factory.mktemp("readme")
    with open(path / "reviews.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        for text, label in list(zip(splits.x_train, splits.y_train))[:120]:
            writer.writerow([text, "5" if label == 1 else "1"])
    return path


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PETLSEARCH_SMOKE": "1", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def check(proc: subprocess.CompletedProcess, what: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{output[-3000:]}"
    assert "Traceback (most recent call last)" not in output, f"{what} printed a traceback:\n{output[-3000:]}"


def executable(command: str) -> list[str]:
    """The command's argv, with `petlsearch` (or `.venv/bin/petlsearch`) this environment's."""
    argv = shlex.split(command)
    if Path(argv[0]).name == "petlsearch":
        argv[0] = str(Path(sys.executable).with_name("petlsearch"))
    elif argv[0] == "python":
        argv[0] = sys.executable
    return argv


def test_the_readme_has_what_this_test_reads() -> None:
    text = README.read_text()
    cmds = commands(text)
    assert any(c.startswith(".venv/bin/petlsearch search") for c in cmds)  # the worked example
    assert sum(c.startswith("petlsearch ") for c in cmds) >= 10
    assert "petlsearch.search(" in python_source(text) and "check_plugin(" in python_source(text)
    assert commands("```bash\npetlsearch show x.yaml   # a comment\n# only a comment\n```\n") == \
        ["petlsearch show x.yaml"]


@pytest.mark.parametrize("command", commands(README.read_text()))
def test_readme_command(command: str, workdir: Path) -> None:
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    check(run(executable(command), workdir), command)


def test_readme_python(workdir: Path) -> None:
    """The Python blocks, after the commands (they read the demo's run folder)."""
    script = workdir / "readme_blocks.py"
    script.write_text(python_source(README.read_text()))
    check(run([sys.executable, str(script)], workdir), "the README's Python blocks")
