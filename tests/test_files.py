"""One process owns a run folder; result files appear whole or not at all."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from petlsearch.errors import PetlsearchError
from petlsearch.files import RunFolderLock, replacing, write_text

HOLD = ("import sys, time; from petlsearch.files import RunFolderLock; RunFolderLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)")


def test_a_second_process_on_a_live_run_folder_fails_naming_the_owner(tiny_task, tmp_path) -> None:
    from petlsearch.runners.search import search
    from tests.strategies.test_random import FAST

    out = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(PetlsearchError, match=f"in use by pid {owner.pid} on host {socket.gethostname()}"):
            search(task=tiny_task, budget="2%", strategy="random", trials=1, out=out, fidelity=FAST, final=FAST)
        assert not (out / "trials.jsonl").exists()  # it did not start
    finally:
        owner.kill()
        owner.wait()
    # the owner died holding it: the lock is free, and the folder (only the lock in it) is a fresh run
    result = search(task=tiny_task, budget="2%", strategy="random", trials=1, out=out, fidelity=FAST, final=FAST)
    assert (out / "structure.yaml").exists() and result.out_dir == out


def test_the_lock_is_exclusive_and_released(tmp_path) -> None:
    with RunFolderLock(tmp_path):
        with pytest.raises(PetlsearchError, match=f"pid {os.getpid()}"):
            RunFolderLock(tmp_path).acquire()
    with RunFolderLock(tmp_path):  # released on exit
        pass


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    path = write_text(tmp_path / "structure.yaml", "old")
    with pytest.raises(RuntimeError):
        with replacing(path) as tmp:
            tmp.write_text("half a new fi")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["structure.yaml"]
    write_text(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1
