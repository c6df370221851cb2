"""`python -m bench [--quick] [--only NAME,...]`: run the benchmarks, write bench/results/.

Each benchmark writes NAME.md and NAME.json (NAME-quick.* in quick mode) and its plots, and this
command writes summary.md (summary-quick.md) with every target. Tables go to stdout, messages to
stderr. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench.common import RESULTS, Options, Report, Table, Target, environment

log = logging.getLogger("bench")
DEFAULT = ("overhead", "scale", "memory", "recipes", "fidelity", "zoo", "horizon", "search", "pruning", "vision")
# hours on 2 CPU cores, resumed from their run logs across sessions: run by name only (--only mpnet)
REAL_BACKBONES = ("mpnet", "smollm2")
BENCHMARKS = DEFAULT + REAL_BACKBONES
CHEAP = ("overhead", "scale", "memory")
SHARED = ("recipes", "fidelity", "zoo", "horizon", "search", "vision", "mpnet", "smollm2")  # made of independent runs kept in a run log: --jobs 2 splits them
SUITE_LIMIT_MIN = 120  # every benchmark in full mode, end to end, on 2 CPU cores (issue 12)


def parse(argv: Sequence[str] | None = None) -> tuple[Options, list[str]]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small, fast versions (what the test suite runs)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all but "
                                              f"{','.join(REAL_BACKBONES)}); 'cheap' = overhead,scale,memory")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: bench/results)")
    p.add_argument("--steps", type=int, help="training steps per run (zoo, search, vision)")
    p.add_argument("--seeds", type=int, help="seeds per method (zoo, vision)")
    p.add_argument("--repeats", type=int, help="interleaved timing rounds (overhead)")
    p.add_argument("--trials", type=int, help="trials per search (search), trials timed (overhead)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 with --quick, else torch's default)")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                   help="2: the training benchmarks (zoo, search, vision) run in two 1-thread processes that "
                        "share their runs through the run log in results/raw/ (faster than one 2-thread process)")
    p.add_argument("--reverse", action="store_true", help=argparse.SUPPRESS)  # a --jobs 2 helper's order
    p.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)  # a --jobs 2 helper: no report
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(DEFAULT)
    names = [m for n in names for m in (CHEAP if n == "cheap" else (n,))]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return Options(args.quick, args.out, args.steps, args.seeds, args.repeats, args.trials, args.threads,
                   args.reverse, args.helper, args.jobs), names


def start_helper(name: str, opts: Options) -> subprocess.Popen:
    """A second process for `name`: the same runs in reverse order, one thread, run log only."""
    args = [sys.executable, "-m", "bench", "--only", name, "--reverse", "--helper", "--threads", "1",
            "--out", str(opts.out)]
    for flag, value in (("--steps", opts.steps), ("--seeds", opts.seeds), ("--trials", opts.trials)):
        if value is not None:
            args += [flag, str(value)]
    if opts.quick:
        args.append("--quick")
    log.info("%s: a helper process shares the runs (pid follows)", name)
    return subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"})


def stop_helper(helper: subprocess.Popen) -> None:
    """The main process has every run: what the helper still computes is a duplicate. SIGINT lets
    it shut down a local Ray cleanly."""
    if helper.poll() is None:
        helper.send_signal(signal.SIGINT)
        try:
            helper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


def run_one(name: str, opts: Options) -> Report:
    import torch

    module = importlib.import_module(f"bench.{name}")
    threads = torch.get_num_threads()
    # one thread by default in quick mode: on a busy shared machine a second thread mostly waits
    torch.set_num_threads(opts.threads or (1 if opts.quick else threads))
    start = time.perf_counter()
    try:
        report = module.run(opts)
    finally:
        torch.set_num_threads(threads)
    report.seconds = time.perf_counter() - start
    if opts.helper:
        return report
    md, js = report.write(opts.out)
    log.info("%s: %.0f s, wrote %s and %s", name, report.seconds, md, js)
    return report


def suite_report(opts: Options, reports: Sequence[Report], seconds: float, env: dict) -> Report | None:
    """The whole run's wall time, when it ran every benchmark in full mode at its own sizes (the
    figure issue 12 asks for); None for any other run."""
    own_sizes = all(v is None for v in (opts.steps, opts.seeds, opts.repeats, opts.trials))
    if opts.quick or not own_sizes or [r.name for r in reports] != list(DEFAULT):
        return None
    report = Report("suite", "The whole suite, end to end", "Every benchmark in full mode in one run, with the "
                    "wall time of each (training benchmarks split over two processes with --jobs 2).", False,
                    env=env, seconds=seconds, command=f"python -m bench --jobs {opts.jobs}")
    table = Table("Wall time", ["benchmark", "minutes"], [[r.name, r.seconds / 60] for r in reports])
    table.add("whole run", seconds / 60)
    report.tables.append(table)
    report.targets.append(Target("every benchmark in full mode, end to end (wall time)", seconds / 60,
                                 SUITE_LIMIT_MIN, "<", " min"))
    return report


def summary(opts: Options) -> Path:
    """summary.md from every report in the results folder (this run's and earlier ones), so that
    benchmarks run one at a time still add up to one table."""
    import json

    table = Table("Targets", ["benchmark", "figure", "measured", "target", "", "measured on"])
    links = []
    for name in ("suite", *BENCHMARKS):
        stem = f"{name}-quick" if opts.quick else name
        path = opts.out / f"{stem}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        links.append(f"[{name}]({stem}.md)")
        for t in data.get("targets", []):
            target = Target(t["name"], t["value"], t["limit"], t["op"], t["unit"])
            table.add(name, *target.row(), data["env"]["date"])
        if data.get("skipped"):
            table.add(name, "(skipped)", data["skipped"], "", "", data["env"]["date"])
    path = opts.out / ("summary-quick.md" if opts.quick else "summary.md")
    path.write_text(f"# Benchmark summary\n\nReports: {', '.join(links)}\n\n{table.markdown()}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    opts, names = parse(argv)
    reports = []
    start, env = time.perf_counter(), environment()
    for name in names:
        log.info("running %s%s", name, " (quick)" if opts.quick else "")
        helper = start_helper(name, opts) if opts.jobs > 1 and name in SHARED else None
        try:
            report = run_one(name, replace(opts, threads=1) if helper else opts)
        finally:
            if helper is not None:
                stop_helper(helper)
        if opts.helper:
            continue
        sys.stdout.write(report.markdown() + "\n")
        reports.append(report)
    if opts.helper:
        return 0
    suite = suite_report(opts, reports, time.perf_counter() - start, env)
    if suite is not None:
        suite.write(opts.out)
        reports.append(suite)
    path = summary(opts)
    log.info("summary: %s", path)
    failed = [f"{r.name}: {t.name}" for r in reports for t in r.targets if not t.passed]
    if failed:
        log.warning("targets missed: %s", "; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
