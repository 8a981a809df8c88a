"""The one way popstack writes a file: a temporary name in the same directory, flush, fsync, rename.

A reader therefore sees either the old complete file or the new complete file, never a partial one, even when
the writer is killed mid-write. Every room may use this module (it lives in the base room, ``datamodules``).

    with atomic_path("out/table.parquet") as tmp:   # any writer that takes a path
        frame.to_parquet(tmp, index=False)
    atomic_write_text("out/config.yaml", text)
    atomic_write_json("out/done.json", {"best": "checkpoints/best.ckpt"})
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

#: Temporary files are ``.<name>.tmp-<pid>`` next to the target: hidden, per process, easy to clean up.
TMP_MARK = ".tmp-"


def temporary_name(path: str | Path) -> Path:
    """The temporary sibling of ``path`` used while it is being written (unique per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _fsync(path: Path) -> None:
    """Flush a written file (or every file of a written directory) to disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is fsynced and renamed over ``path``.

    Works for a file or a directory written at the temporary path. On an exception the temporary path is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    _remove(tmp)
    try:
        yield tmp
        _fsync(tmp)
        if tmp.is_dir() and path.is_dir():
            _remove(path)  # os.replace cannot replace a non-empty directory
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _remove(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, payload: Any, indent: int | None = 1) -> Path:
    """JSON with sorted keys (stable bytes for hashing); values that JSON lacks are written with ``str``."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, sort_keys=True, default=str))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
