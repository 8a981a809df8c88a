"""Shared helpers of the benchmark scripts: timing, peak RSS in a fresh process, tables, JSON results."""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def _child(fn: Callable[..., dict], args: tuple, queue) -> None:
    start = time.perf_counter()
    out = fn(*args)
    out["seconds"] = round(time.perf_counter() - start, 2)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)
    queue.put(out)


def measure(fn: Callable[..., dict], *args) -> dict:
    """Run ``fn(*args)`` in a fresh forked process; returns its dict plus seconds and peak RSS (GB)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": platform.machine(), "python": platform.python_version(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {path}")
    return path
