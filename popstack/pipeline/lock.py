"""One writer per run directory: an advisory lock on ``<run>/.lock`` held for the whole ``train.py`` run.

The lock is an ``fcntl.flock`` on the file, so the kernel releases it when the holder exits or dies (a stale lock
left by a killed process is simply free); the file's content names the holder (pid, host, start time) for the
message the second process prints. Only the first process of a run takes it: DDP children re-run the command
line inside the run the first process holds.

Where the file system has no ``flock`` (Lustre or NFS mounted without it: the call raises ENOSYS, EOPNOTSUPP or
ENOLCK), the lock falls back, with one warning line, to a lock file created with ``O_EXCL`` (``<run>/.lock.held``)
naming its holder and removed on release. Such a file outlives a killed holder: one left by a dead process of this
host is taken over; one from another host must be deleted by hand (the error says so).

    with RunLock(run_dir):
        ...  # stages
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from popstack.pipeline.errors import UserError
from popstack.pipeline.layout import RunLayout

log = logging.getLogger("popstack")

#: ``flock`` errors meaning "not supported here" (not "held by another process"): fall back to an O_EXCL file.
NO_FLOCK = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK})


def _holder_info() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %z")})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory; raises ``UserError`` naming the holder when another process has it."""

    def __init__(self, run_dir: str | Path):
        layout = RunLayout(Path(run_dir))
        self.path, self.held_path = layout.lock, layout.lock_held
        self._fd: int | None = None
        self._held = False

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(fd)
            raise UserError(f"run directory {self.path.parent} is in use by {holder}; wait for it to finish "
                            f"or use another hydra.run.dir") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in NO_FLOCK:
                raise
            log.warning("run lock: this file system has no flock (%s); locking with the exclusive file %s instead",
                        errno.errorcode.get(err.errno, err.errno), self.held_path)
            return self._acquire_exclusive_file()
        # The lock file is not an output: it is rewritten in place under the lock, never read as data.
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_info().encode(), 0)
        self._fd = fd
        return self

    def _acquire_exclusive_file(self) -> "RunLock":
        """The fallback: create ``held_path`` with O_EXCL (atomic on local file systems, NFSv3+ and Lustre)."""
        for _ in range(2):
            try:
                fd = os.open(self.held_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self._read(self.held_path)
                if info and info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
                    log.warning("run lock: %s was left by pid %s, which has exited; taking it over",
                                self.held_path, info.get("pid"))
                    self.held_path.unlink(missing_ok=True)
                    continue
                raise UserError(f"run directory {self.path.parent} is in use by {self.holder()}; wait for it to "
                                f"finish or use another hydra.run.dir (this file system has no flock: if that "
                                f"process is gone, delete {self.held_path})") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(_holder_info())
            self._held = True
            return self
        raise UserError(f"run lock: could not create {self.held_path}; delete it if no process holds the run")

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def holder(self) -> str:
        """The holder as written in the lock file, in words (``pid 123 on host since 2026-...``)."""
        for path in (self.held_path, self.path):
            info = self._read(path)
            try:
                return f"pid {info['pid']} on {info['host']} (started {info['started']})"
            except (KeyError, TypeError):
                continue
        return "another process (its details are not written yet)"

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._held:
            self.held_path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
