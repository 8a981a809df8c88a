"""One writer per run directory: an advisory lock on ``<run>/.lock`` held for the whole ``train.py`` run.

The lock is an ``fcntl.flock`` on the file, so the kernel releases it when the holder exits or dies (a stale lock
left by a killed process is simply free); the file's content names the holder (pid, host, start time) for the
message the second process prints. Only the first process of a run takes it: DDP children re-run the command
line inside the run the first process holds.

    with RunLock(run_dir):
        ...  # stages
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.layout import RunLayout


class RunLock:
    """Exclusive lock on a run directory; raises ``UserError`` naming the holder when another process has it."""

    def __init__(self, run_dir: str | Path):
        self.path = RunLayout(Path(run_dir)).lock
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(fd)
            raise UserError(f"run directory {self.path.parent} is in use by {holder}; wait for it to finish "
                            f"or use another hydra.run.dir") from None
        # The lock file is not an output: it is rewritten in place under the lock, never read as data.
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """The holder as written in the lock file, in words (``pid 123 on host since 2026-...``)."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']} (started {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (its details are not written yet)"

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
