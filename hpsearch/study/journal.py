"""Optuna's journal file, made safe against dead writers and full disks.

Two failures of Optuna's own `JournalFileBackend` (issue 13, reproduced on this project's VM):
- A write that fails half-way (a full disk, a killed process) leaves a torn last line. Optuna's
  reader skips a torn *last* line, but the next append is glued onto it, and from then on every
  read fails ("Expecting ',' delimiter"): the whole study is lost. `RepairingJournalBackend`
  never appends after a torn line: under the lock it cuts a torn tail before writing, and a
  write that fails is rolled back to where it started.
- Optuna's default lock is a symlink that a SIGKILLed writer leaves behind; every other worker
  then waits ~30 s for its grace period ("Forcibly releasing the lock file"). `FlockLock` is an
  `flock`, which the kernel releases when its holder dies, as hpsearch's `StudyLock` is.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from optuna.storages.journal import JournalFileBackend

try:
    import fcntl
except ImportError:  # Windows: Optuna's own lock
    fcntl = None

_TAIL_CHUNK = 1 << 16


class FlockLock:
    """An exclusive `flock` on a side file, for processes, plus a mutex for the threads of one (the
    interface of Optuna's journal file locks: acquire, release)."""

    def __init__(self, path: str):
        self.path = path
        self._threads = threading.Lock()  # the heartbeat thread appends too
        self._fd: int | None = None

    def acquire(self) -> bool:
        self._threads.acquire()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self._threads.release()
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                os.close(fd)  # releases the flock
        finally:
            self._threads.release()


def complete_length(path: str) -> int:
    """The length of the file up to and including its last newline (0 if it has none)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - _TAIL_CHUNK)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            pos = start
        return 0


class RepairingJournalBackend(JournalFileBackend):
    """A journal file that is never appended to after a torn line (see the module docstring)."""

    def __init__(self, file_path: str):
        lock = FlockLock(file_path + "-hpsearch-journal-lock") if fcntl is not None else None
        super().__init__(file_path, lock)
        self._locked(self._cut_torn_tail)

    def _locked(self, action):
        self._lock.acquire()
        try:
            return action()
        finally:
            self._lock.release()

    def _cut_torn_tail(self) -> int:
        """Drop a half-written last line (only a failed or killed writer leaves one: we hold the lock)."""
        with open(self._file_path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0 or (f.seek(size - 1) >= 0 and f.read(1) == b"\n"):
                return size  # the usual case: one byte read per append
        keep = complete_length(self._file_path)
        if keep < size:
            os.truncate(self._file_path, keep)
        return keep

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")

        def append() -> None:
            start = self._cut_torn_tail()
            try:
                with open(self._file_path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                os.truncate(self._file_path, start)  # roll back a partial write (needs no free space)
                raise

        self._locked(append)
