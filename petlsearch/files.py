"""Files a crash never leaves half-written, and run folders one process owns.

`replacing(path)` yields a temporary name beside `path` and renames it over `path` only once the
writer has finished (os.replace is atomic on one file system), so a reader sees the old file or the
new one, never a part. `RunFolderLock` is an advisory lock (flock) on `<folder>/.lock` holding the
owner's pid and host: a second process on the folder fails in one line naming the owner, and a lock
left by a process that died is free again (the kernel drops a dead process's flock).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from petlsearch.errors import PetlsearchError

LOCK_NAME = ".lock"


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """`with replacing(p) as tmp: write(tmp)`: `p` appears whole when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_tensors(path: str | Path, tensors: dict[str, Any]) -> Path:
    """Write a safetensors file atomically (see `replacing`)."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file(tensors, str(tmp))
    return Path(path)


class FolderLock:
    """An advisory lock (flock) on the file `path`, which names its holder (pid and host).
    `wait`: block until it is free (a cache being built), else fail at once naming the holder."""

    def __init__(self, path: str | Path, what: str = "", wait: bool = False) -> None:
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise PetlsearchError(f"{self.what} is in use by {self.owner()}; wait for it to finish, or choose "
                                  "another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def owner(self) -> str:
        """'pid N on host H' as the holder wrote it."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, naming the last holder
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunFolderLock(FolderLock):
    """Held while a process searches in `folder` (`<folder>/.lock`); a second process fails at once."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(Path(folder) / LOCK_NAME, what=f"run folder {folder}")
