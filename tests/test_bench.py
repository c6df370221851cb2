"""The benchmark suite: every benchmark's quick mode runs and writes its tables, and the timing,
ratio and report helpers do what the figures rely on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS, DEFAULT, parse, run_one, summary
from bench.common import (
    Options,
    Report,
    RunLog,
    Table,
    Target,
    fmt,
    interleave,
    paired_ratio,
    peak_python_memory,
    spread,
    std,
)


def _check_written(report: Report, out: Path) -> dict:
    md, js = out / f"{report.name}-quick.md", out / f"{report.name}-quick.json"
    assert md.is_file() and js.is_file()
    data = json.loads(js.read_text())
    assert data["name"] == report.name and data["quick"] is True
    assert data["env"]["load_start"] is not None and "load_end" in data["env"]
    text = md.read_text()
    for table in report.tables:
        assert table.rows, f"{report.name}: table '{table.title}' is empty"
        assert all(len(r) == len(table.columns) for r in table.rows)
        assert f"### {table.title}" in text
    for plot in report.plots:
        assert Path(plot).is_file() and Path(plot).stat().st_size > 1000
    return data


def _rows(table: Table) -> dict[str, dict[str, object]]:
    return {str(r[1] if table.columns[0] == "budget" else r[0]): dict(zip(table.columns, r)) for r in table.rows}


def test_overhead_quick(tmp_path: Path) -> None:
    report = run_one("overhead", Options(quick=True, out=tmp_path))
    data = _check_written(report, tmp_path)
    assert [t["name"] for t in data["targets"]][:2] == ["LoRA training step, petlsearch / peft",
                                                        "IA3 training step, petlsearch / peft"]
    assert all(math.isfinite(t["value"]) and t["value"] > 0 for t in data["targets"])
    steps = _rows(report.tables[0])
    assert set(steps) == {"lora", "ia3"}  # same trainable counts were checked when the models were built
    assert data["data"]["per_trial_s"] < 30  # the engine path ran (a hang or a retry loop would not)


def test_scale_quick(tmp_path: Path) -> None:
    report = run_one("scale", Options(quick=True, out=tmp_path))
    _check_written(report, tmp_path)
    models = report.data["models"]
    mini = models["all-MiniLM-L6-v2"]
    assert mini["params"] == 22_713_216 and mini["layers"] == 6 and mini["candidates"] > 50
    growth = report.tables[1].rows
    assert [r[0] for r in growth] == [2, 4] and growth[1][5] == 2 * growth[0][5]  # candidates grow with layers


def test_memory_quick(tmp_path: Path) -> None:
    report = run_one("memory", Options(quick=True, out=tmp_path))
    _check_written(report, tmp_path)
    for label in ("tiny BERT", "tiny T5", "tiny ViT"):
        rows = {r["plugin"]: r for r in report.data[label]}
        assert {"lora", "ia3"} <= set(rows)
        for r in rows.values():
            assert abs(r["error"]) <= 0.15, (label, r)
    assert report.targets[0].passed
    vqt = report.data["vqt"]  # VQT's queries keep backward out of the ViT: below LoRA at every batch
    assert vqt["model"] == "tiny ViT"
    assert all(vqt["measured"]["vqt"][b] < vqt["measured"]["lora"][b] for b in vqt["measured"]["lora"])


def test_zoo_quick(tmp_path: Path) -> None:
    report = run_one("zoo", Options(quick=True, out=tmp_path))
    _check_written(report, tmp_path)
    rows = _rows(report.tables[0])
    assert {"full fine-tuning", "head only", "lora", "bitfit", "peft lora"} <= set(rows)
    assert rows["lora"]["trainable"] == rows["peft lora"]["trainable"] > 0  # the same modules
    assert rows["head only"]["trainable"] == 0 and rows["full fine-tuning"]["memory / full FT"] == 1.0
    assert 0.0 <= rows["lora"]["test acc"] <= 1.0


def test_mpnet_quick(tmp_path: Path) -> None:
    report = run_one("mpnet", Options(quick=True, out=tmp_path))
    _check_written(report, tmp_path)
    rows = _rows(report.tables[0])
    assert set(rows) == {"full fine-tuning", "head only", "lora", "lst"}
    assert rows["head only"]["trainable"] == 0 < rows["lst"]["trainable"]
    search = _rows(report.tables[1])  # keyed by method
    assert "s3pet" in search and any(k.startswith("best hand-made") for k in search)
    assert 0 < search["s3pet"]["trainable"] and report.data["searches"]["0.1%"][0]["strategy"] == "s3pet"
    memory = _rows(report.tables[2])
    assert memory["full fine-tuning"]["/ full FT"] == 1.0 and 0 < memory["lst"]["/ full FT"] < 1.0
    names = [t.name.split()[0] for t in report.targets]
    assert names[:3] == ["lst", "vqt", "LST's"] and names[3:] == ["s3pet", "s3pet"]


def test_smollm2_quick(tmp_path: Path) -> None:
    report = run_one("smollm2", Options(quick=True, out=tmp_path))
    _check_written(report, tmp_path)
    rows = _rows(report.tables[0])
    assert {"pretrained (no training)", "full fine-tuning", "LoRA q,v", "LST", "search 0.1% (s3pet)"} <= set(rows)
    assert rows["pretrained (no training)"]["trainable"] == 0 < rows["LoRA q,v"]["trainable"] < rows["LoRA"]["trainable"]
    assert all(r["test perplexity"] > 1.0 for r in rows.values())


def test_recipes_quick(tmp_path: Path) -> None:
    report = run_one("recipes", Options(quick=True, out=tmp_path))
    _check_written(report, tmp_path)
    rows = {r[0]: r for r in report.tables[0].rows}
    assert set(rows) == {"lora", "bitfit"} and report.data["best"]["lora"] in (1e-3, 1e-2)
    assert rows["lora"][1] > 0  # trainable parameters of the plugin at its default size
    heads = {r[0]: r for r in report.tables[1].rows}
    assert set(heads) == {"head only", "bitfit"} and set(report.data["head_best"].values()) <= {1e-2, 3e-2, 1e-1}
    assert heads["head only"][1] == "" and float(heads["bitfit"][1]) > 0  # bitfit at its recipe rate
    assert len(heads["bitfit"][3].split(" / ")) == 3  # one validation accuracy per head rate


def test_fidelity_quick(tmp_path: Path) -> None:
    report = run_one("fidelity", Options(quick=True, out=tmp_path))
    data = _check_written(report, tmp_path)
    trials, finals = data["data"]["trials"], data["data"]["finals"]
    assert len(trials) == len(finals) == 3 and all(f["test"] is not None for f in finals)
    assert all(0.1 <= t["lr_scale"] <= 10 for t in data["data"]["train"])  # drawn as the random strategy does
    assert {"validation accuracy", "accuracy, loss as tie-break"} < set(data["data"]["rho"])


def test_search_quick(tmp_path: Path) -> None:
    report = run_one("search", Options(quick=True, out=tmp_path))
    _check_written(report, tmp_path)
    searches = report.data["searches"]
    assert {r["strategy"] for r in searches} == {"random", "s3pet"}
    backbone = 999_072 - 66  # the tiny BERT without its head (2 x 32 + 2)
    assert all(0 < r["params"] <= 0.001 * backbone + 1 for r in searches)
    assert all(r["cost"] > 0 for r in searches)
    assert report.data["hand_made"]["0.1%"]["params"] <= 0.001 * backbone + 1
    full = report.data["full_finetuning"]
    assert full["seeds"] == 1 and full["tests"] == [full["test"]] and full["std"] == 0.0


@pytest.mark.ray
def test_pruning_quick(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    report = run_one("pruning", Options(quick=True, out=tmp_path))
    _check_written(report, tmp_path)
    runs = report.data["runs"]
    assert set(runs) == {"fifo", "asha"} and runs["fifo"]["pruned"] == 0
    assert all(r["trials"] == 4 and r["seconds"] > 0 for r in runs.values())
    assert runs["asha"]["steps"] <= runs["fifo"]["steps"] == 4 * 4


def test_vision_quick(tmp_path: Path) -> None:
    report = run_one("vision", Options(quick=True, out=tmp_path))
    _check_written(report, tmp_path)
    if report.skipped:
        pytest.skip(report.skipped)
    rows = _rows(report.tables[0])
    assert set(rows) == {"full fine-tuning", "linear probe", "bitfit (BatchNorm)", "lora (1x1 convs)"}
    trainable = [rows[m]["trainable"] for m in ("linear probe", "bitfit (BatchNorm)", "lora (1x1 convs)")]
    assert trainable[0] == 0 < trainable[1] < trainable[2]
    tip = report.tables[1]  # Tip-Adapter, training-free and -F, beside the probe
    assert tip.columns[1:] == ["cache alone", "cache-F alone", "linear probe", "probe + cache", "probe + cache-F"]
    assert all(0.0 <= v <= 1.0 for row in tip.rows for v in row[1:])


# ---------------------------------------------------------------------------- helpers
def test_interleave_alternates_order_and_times_every_round() -> None:
    calls: list[str] = []
    times = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert len(times["a"]) == len(times["b"]) == 3


def test_paired_ratio_cancels_shared_drift() -> None:
    a, b = [2.0, 4.0, 8.0], [1.0, 2.0, 4.0]  # the load doubled each round: the ratio stays 2
    assert paired_ratio(a, b) == (2.0, 0.0)
    assert spread([1.0]) == 0.0


def test_std_over_seeds() -> None:
    assert std([0.7]) == 0.0  # one seed: no spread, not an error
    assert std([0.7, 0.8, 0.9]) == pytest.approx(0.1)


def test_peak_python_memory_sees_allocations() -> None:
    peak, result = peak_python_memory(lambda: len([bytearray(1000) for _ in range(1000)]))
    assert result == 1000 and peak >= 1_000_000


def test_table_and_target() -> None:
    t = Table("t", ["a", "b"])
    t.add(1234, 0.5)
    with pytest.raises(ValueError, match="2 columns"):
        t.add(1)
    assert "| 1,234 | 0.5 |" in t.markdown()
    assert Target("x", 1.0, 1.05).passed and not Target("x", 1.1, 1.05).passed
    assert not Target("x", float("nan"), 1.0).passed and Target("x", 0.4, 0.5, "<").passed
    assert fmt(float("nan")) == "n/a" and fmt(1e-5) == "1.00e-05"


def test_run_log_resumes_and_shares_finished_runs(tmp_path: Path) -> None:
    path = tmp_path / "raw" / "x-runs.jsonl"
    first, second = RunLog(path), RunLog(path)  # two processes on one log (--reverse)
    calls = []
    key = RunLog.key(method="lora", seed=0)
    assert first.run(key, lambda: calls.append(1) or {"test": 0.7}) == {"test": 0.7}
    assert second.run(key, lambda: calls.append(2) or {"test": 0.0}) == {"test": 0.7}  # finished elsewhere
    with path.open("a") as f:
        f.write('{"key": "cut off by a ki')  # a kill mid-write
    assert RunLog(path).get(key) == {"test": 0.7} and calls == [1]


def test_run_all_in_reverse_shares_the_work_and_keeps_the_order(tmp_path: Path) -> None:
    path = tmp_path / "raw" / "x-runs.jsonl"
    done: list[str] = []
    work = [(RunLog.key(i=i), lambda i=i: done.append(f"main {i}") or i * 10) for i in range(4)]
    helper = RunLog(path)  # a --jobs 2 helper got through the last two before the main process got there
    for key, _ in work[2:][::-1]:
        helper.run(key, lambda key=key: done.append(f"helper {key}") or json.loads(key)["i"] * 10)
    assert RunLog(path).run_all(work) == [0, 10, 20, 30]
    assert done == ['helper {"i": 3}', 'helper {"i": 2}', "main 0", "main 1"]
    assert RunLog(tmp_path / "other.jsonl").run_all(work, reverse=True) == [0, 10, 20, 30]
    assert done[-4:] == ["main 3", "main 2", "main 1", "main 0"]


def test_jobs_2_runs_a_helper_that_fills_the_run_log(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "zoo", "--jobs", "2", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "a helper process shares the runs" in out.stderr
    assert (tmp_path / "zoo-quick.md").exists() and (tmp_path / "raw" / "zoo-quick-runs.jsonl").exists()
    assert parse(["--jobs", "2"])[0].jobs == 2


def test_cli_options(tmp_path: Path) -> None:
    opts, names = parse(["--quick", "--only", "cheap,zoo", "--out", str(tmp_path), "--steps", "5"])
    assert names == ["overhead", "scale", "memory", "zoo"] and opts.quick and opts.steps == 5
    assert parse([])[1] == list(DEFAULT)  # the real backbones' hours-long runs only by name
    assert parse(["--only", "mpnet"])[1] == ["mpnet"] and set(BENCHMARKS) == {*DEFAULT, "mpnet", "smollm2"}
    with pytest.raises(SystemExit):
        parse(["--only", "nonsense"])
    # the summary gathers every report in the folder: one written earlier, one now
    Report("scale", "Scale", "d", True, targets=[Target("fast", 2.0, 1.0)]).write(tmp_path)
    Report("memory", "Memory", "d", True, targets=[Target("small", 0.5, 1.0)]).write(tmp_path)
    text = summary(Options(quick=True, out=tmp_path)).read_text()
    assert "| scale | fast | 2 | <= 1 | FAIL |" in text and "| memory | small | 0.5 | <= 1 | pass |" in text


def test_suite_report_times_a_full_run_of_every_benchmark(tmp_path: Path) -> None:
    from bench.__main__ import suite_report
    from bench.common import environment

    reports = [Report(name, name, "d", False, seconds=600.0) for name in DEFAULT]
    full = Options(out=tmp_path, jobs=2)
    suite = suite_report(full, reports, 7300.0, environment())
    assert suite is not None and suite.command == "python -m bench --jobs 2"
    assert [t.name for t in suite.targets] == ["every benchmark in full mode, end to end (wall time)"]
    assert not suite.targets[0].passed  # 121.7 minutes
    assert suite_report(full, reports, 7000.0, environment()).targets[0].passed
    suite.write(tmp_path)
    text = summary(Options(out=tmp_path)).read_text()
    assert "| suite | every benchmark in full mode, end to end (wall time) | 122 min | < 120 min | FAIL |" in text
    # not a whole full-size run: a subset, quick mode, or sizes changed on the command line
    assert suite_report(full, reports[:-1], 7000.0, environment()) is None
    assert suite_report(Options(quick=True), reports, 7000.0, environment()) is None
    assert suite_report(Options(steps=10), reports, 7000.0, environment()) is None


def test_a_run_claimed_by_a_live_process_is_waited_for_not_run_twice(tmp_path: Path) -> None:
    """Where two --jobs 2 processes meet, the second waits for the first's run; a claim left by a
    process that died is taken over."""
    import subprocess
    import sys
    import threading

    log = RunLog(tmp_path / "raw" / "x-runs.jsonl")
    key, other = RunLog.key(i=0), RunLog.key(i=1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        claim = log._claim_path(key)
        claim.parent.mkdir(parents=True)
        claim.write_text(str(sleeper.pid))  # the other process is running `key`
        threading.Timer(0.3, lambda: (RunLog(log.path).put(key, 7), claim.unlink())).start()  # ... and finishes it
        assert log.run(key, lambda: 1 / 0) == 7  # waited, did not compute
    finally:
        sleeper.kill()
        sleeper.wait()
    log._claim_path(other).write_text(str(sleeper.pid))  # a claim whose process has died
    assert log.run(other, lambda: 8) == 8
    assert not list(claim.parent.iterdir())  # finished runs leave no claim behind


def test_horizon_quick(tmp_path: Path) -> None:
    report = run_one("horizon", Options(quick=True, out=tmp_path))
    data = _check_written(report, tmp_path)
    runs = data["data"]["runs"]
    assert set(runs) == {"head only", "prompt_tuning"}
    assert [int(s) for s, _, _ in runs["prompt_tuning"]["curve"]] == [2, 4]  # every 2 of 4 steps, and the end
    assert runs["head only"]["trainable"] == 0 < runs["prompt_tuning"]["trainable"]
