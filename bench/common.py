"""What every benchmark shares: options, interleaved timing with medians and paired ratios, peak
Python memory, and the report (markdown + JSON, optional PNG plots) written under bench/results/.

The machines this runs on are shared CPUs whose load changes by the second, so absolute times mean
little. Timings that are compared run in one process, interleaved (A B B A ...), several rounds; a
ratio is the median of the per-round ratios, which cancels most of the drift in the load. Each
report records os.getloadavg() before and after.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Options:
    """Command-line options every benchmark reads (None: the benchmark's own default)."""

    quick: bool = False
    out: Path = RESULTS
    steps: int | None = None  # training steps per run (zoo, search, vision)
    seeds: int | None = None  # seeds per method (zoo, vision)
    repeats: int | None = None  # timing rounds (overhead)
    trials: int | None = None  # trials per search (search)
    threads: int | None = None  # torch threads (None: 1 in quick mode, torch's default otherwise)
    reverse: bool = False  # runs in reverse order: a second process shares the work through the run log
    helper: bool = False  # only fill the run log (a --jobs 2 helper): no report, no untracked extras
    jobs: int = 1  # 2: zoo, search and vision also run in a helper process (see bench.__main__)

    def pick(self, quick: Any, full: Any, override: Any = None) -> Any:
        """`override` when given, else the quick or the full default."""
        if override is not None:
            return override
        return quick if self.quick else full


# ---------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, inner: int = 1,
               warmup: int = 1) -> dict[str, list[float]]:
    """Per-round times of each function, run alternately in one process.

    Each round runs every function `inner` times and keeps the median of those calls; the order of
    the functions reverses every round (A B, B A, ...) so that neither always runs first after the
    other. `warmup` untimed calls of each come first (allocator, caches, lazy init)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(statistics.median(timed(fns[name])[0] for _ in range(inner)))
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def std(xs: Sequence[float]) -> float:
    """The sample standard deviation (the +- of a mean over seeds), 0 for fewer than 2 values."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def spread(xs: Sequence[float]) -> float:
    """Half the inter-quartile range (a robust +-), 0 for fewer than 2 values."""
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return float((q[2] - q[0]) / 2)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(median, half-IQR) of the per-round ratios a_i / b_i: rounds ran side by side, so the load
    they shared cancels."""
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    return median(ratios), spread(ratios)


def peak_python_memory(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak bytes of Python allocations during fn, result), by tracemalloc. Tensors' storage is
    not counted (torch allocates it in C); on the meta device there is none anyway."""
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was:
            tracemalloc.stop()
    return max(0, peak), result


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (how busy the shared machine was)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment() -> dict[str, Any]:
    import torch

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_start": load(),
    }


# ---------------------------------------------------------------------------- reports
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""

    def add(self, *row: Any) -> None:
        if len(row) != len(self.columns):
            raise ValueError(f"table '{self.title}': row of {len(row)} values for {len(self.columns)} columns")
        self.rows.append(list(row))

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


@dataclass
class Target:
    """A figure with its goal: passed when `value op limit` (op '<=' or '>=' or '<')."""

    name: str
    value: float
    limit: float
    op: str = "<="
    unit: str = ""

    @property
    def passed(self) -> bool:
        if self.value != self.value:  # NaN: not measured
            return False
        return {"<=": self.value <= self.limit, "<": self.value < self.limit,
                ">=": self.value >= self.limit}[self.op]

    def row(self) -> list[Any]:
        return [self.name, f"{fmt(self.value)}{self.unit}", f"{self.op} {fmt(self.limit)}{self.unit}",
                "pass" if self.passed else "FAIL"]


@dataclass
class Report:
    name: str
    title: str
    description: str
    quick: bool
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    env: dict[str, Any] = field(default_factory=environment)
    seconds: float = 0.0
    command: str = ""  # how to make it again (default: this benchmark alone)

    @property
    def stem(self) -> str:
        return f"{self.name}-quick" if self.quick else self.name

    def markdown(self) -> str:
        env = self.env
        command = self.command or f"python -m bench {'--quick ' if self.quick else ''}--only {self.name}"
        out = [f"## {self.title}", "", self.description, "",
               f"Command: `{command}`. {env['date']}, {env['cpus']} CPUs "
               f"({env['machine']}), torch {env['torch']} with {env['torch_threads']} threads"
               f"{', ' + env['cuda'] if env.get('cuda') else ''}; load average (1/5/15 min) "
               f"{env['load_start']} at the start, {env.get('load_end')} at the end; {self.seconds:.0f} s.", ""]
        if self.skipped:
            out += [f"Skipped: {self.skipped}", ""]
        if self.targets:
            t = Table("Targets", ["figure", "measured", "target", ""], [x.row() for x in self.targets])
            out.append(t.markdown())
        out += [t.markdown() for t in self.tables]
        out += [f"![{Path(p).stem}]({Path(p).name})\n" for p in self.plots]
        if self.notes:
            out += ["Notes:", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = [{**asdict(t), "passed": t.passed} for t in self.targets]
        return d

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.env["load_end"] = load()
        md, js = out_dir / f"{self.stem}.md", out_dir / f"{self.stem}.json"
        md.write_text(self.markdown())
        js.write_text(json.dumps(self.to_dict(), indent=2, default=_plain))
        return md, js


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def fmt(v: Any) -> str:
    """Compact cell text: 3 significant figures for floats, thousands separators for ints."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return f"{v:.2e}"
    return str(v)


class RunLog:
    """Finished runs of an expensive benchmark, one JSON line each, so that an interrupted full run
    resumes where it stopped: a run is keyed by everything that decides its result."""

    def __init__(self, path: Path) -> None:
        from petlsearch.strategies.journal import Journal

        self.path = path
        self.journal = Journal(path, default=_plain)  # fsynced appends; a line torn by a kill is skipped
        self.done: dict[str, Any] = {}
        self._load()

    def _load(self) -> None:
        for rec in self.journal.records(by="key"):
            self.done[rec["key"]] = rec["value"]

    @staticmethod
    def key(**parts: Any) -> str:
        return json.dumps(parts, sort_keys=True, default=str)

    def get(self, key: str) -> Any:
        """The finished run `key`, also when another process (e.g. `--reverse`) finished it since."""
        if key not in self.done:
            self._load()
        return self.done.get(key)

    def run(self, key: str, compute: Callable[[], Any]) -> Any:
        """The finished run `key`, or `compute()` now, recorded before it is returned. The run is
        claimed while it computes: a second process (a --jobs 2 helper going the other way) that
        reaches it then waits for its value instead of running it twice."""
        value = self.get(key)
        while value is None and not self._claim(key):
            value = self._wait(key)
        if value is None:
            try:
                value = compute()
                self.put(key, value)
            finally:
                self._claim_path(key).unlink(missing_ok=True)
        return value

    def run_all(self, work: list[tuple[str, Callable[[], Any]]], reverse: bool = False) -> list[Any]:
        """Every (key, compute) of `work`, in order or (a helper process) in reverse: two processes
        going opposite ways share the work and meet in the middle. Values in `work`'s order."""
        values: list[Any] = [None] * len(work)
        for i in reversed(range(len(work))) if reverse else range(len(work)):
            values[i] = self.run(*work[i])
        return values

    def _claim_path(self, key: str) -> Path:
        import hashlib

        return self.path.parent / f"{self.path.stem}.claims" / hashlib.sha1(key.encode()).hexdigest()

    def _claim(self, key: str) -> bool:
        """Mark `key` as running in this process; False when a live process holds it already (a
        claim left by a process that died is taken over)."""
        path = self._claim_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = path.with_name(f"{path.name}.{os.getpid()}")
        mine.write_text(str(os.getpid()))
        try:
            for _ in range(2):
                try:
                    os.link(mine, path)  # atomic: the claim appears with its pid already in it
                    return True
                except FileExistsError:
                    if _alive(path):
                        return False
                    path.unlink(missing_ok=True)
            return False
        finally:
            mine.unlink(missing_ok=True)

    def _wait(self, key: str, poll: float = 2.0) -> Any:
        """The value of a run another process claimed, once it lands in the log; None if that
        process let go of it without one (it failed or died)."""
        while self.get(key) is None and _alive(self._claim_path(key)):
            time.sleep(poll)
        return self.get(key)

    def put(self, key: str, value: Any) -> None:
        self.done[key] = value
        self.journal.append({"key": key, "value": value})


def _alive(claim: Path) -> bool:
    """Whether the process that wrote `claim` still runs."""
    try:
        pid = int(claim.read_text())
    except (FileNotFoundError, ValueError):
        return False
    if pid <= 0:  # os.kill would probe a process group, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def mib(n: float) -> float:
    return n / 2**20


def plt() -> Any:
    """matplotlib.pyplot with the Agg backend (no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot
