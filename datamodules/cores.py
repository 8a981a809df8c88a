"""How many CPU cores this process may use (shared by the rooms that spread work over processes or threads)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware; ``os.cpu_count()`` where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
