"""Progress that suits where the output goes: a tqdm bar on a terminal, plain periodic log lines otherwise.

    bar = progress(total=n, desc="sentence encoder", unit="batch", enabled=cfg.progress_bar)
    for item in progress(items, desc="embedding cache", unit="batch"): ...

A bar redraws itself with carriage returns; in a captured log (stderr redirected to a file, a SLURM job's output,
a CI log) those redraws pile up between the log lines. When stderr is not a terminal, the same calls instead write
one ``popstack`` INFO line at most every ``LOG_EVERY_S`` seconds (and one at the end): ``<desc>: 120/900 batch
(13%) in 14 s``. ``POPSTACK_PROGRESS=bar|log|off`` forces one behaviour.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable

log = logging.getLogger("popstack")
#: Seconds between two progress lines in a captured log.
LOG_EVERY_S = 30.0
#: ``bar``, ``log`` or ``off``: overrides the terminal test.
MODE_ENV = "POPSTACK_PROGRESS"


def progress_mode(enabled: bool = True) -> str:
    """``bar`` (stderr is a terminal), ``log`` (it is not) or ``off`` (``enabled`` False)."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if not enabled or forced == "off":
        return "off"
    if forced in ("bar", "log"):
        return forced
    return "bar" if sys.stderr.isatty() else "log"


class LogProgress:
    """The part of tqdm's interface the pipeline uses (``update``, ``set_postfix_str``, ``close``, iteration),
    writing periodic log lines instead of redrawing a bar."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 every_s: float = LOG_EVERY_S, **_: Any):
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, every_s
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, 0, ""
        self.start = self.last = time.perf_counter()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._line()

    def _line(self) -> None:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f" [{self.postfix}]" if self.postfix else ""
        log.info("%s: %s %s%s in %.0f s%s", self.desc, done, self.unit, share, time.perf_counter() - self.start,
                 extra)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n and time.perf_counter() - self.start >= self.every_s:  # short tasks: no line at all
                self._line()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, every_s: float | None = None):
    """A tqdm bar (stderr a terminal), a ``LogProgress`` (not a terminal; a line at most every ``every_s``,
    default ``LOG_EVERY_S``) or a disabled bar; see the module docstring."""
    mode = progress_mode(enabled)
    if mode == "log":
        return LogProgress(iterable, total=total, desc=desc, unit=unit,
                           every_s=LOG_EVERY_S if every_s is None else every_s)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=mode == "off", leave=False)
