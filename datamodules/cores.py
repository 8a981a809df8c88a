"""How many CPU cores this process may use (shared by the rooms that spread work over processes or threads)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware; ``os.cpu_count()`` where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cores_per_rank(ranks_per_node: int = 1, env: dict | None = None) -> int:
    """Cores one of ``ranks_per_node`` processes of this node may use: the cores this process may run on,
    shared by the ranks that see the same cores. Under SLURM with ``--cpus-per-task`` the affinity already is this
    task's own (the cores are not divided again); under torchrun (``LOCAL_WORLD_SIZE``) or Lightning's launcher
    every rank sees every core of the node, so they are divided by the ranks on it."""
    env = os.environ if env is None else env
    cores = available_cores()
    task_cpus = env.get("SLURM_CPUS_PER_TASK")
    if task_cpus and task_cpus.isdigit() and cores <= int(task_cpus):
        return cores
    sharing = int(env.get("LOCAL_WORLD_SIZE") or ranks_per_node or 1)
    return max(1, cores // max(1, sharing))


def loader_workers(setting: int | str, ranks_per_node: int = 1, env: dict | None = None) -> int:
    """``data.num_workers``: an integer as is, or ``auto``: one worker per core of this rank (``cores_per_rank``)
    less one for the process that drives the model (0, decoding in that process, when the rank has one core);
    never more worker processes than the rank's cores."""
    if str(setting).lower() != "auto":
        return int(setting)
    return cores_per_rank(ranks_per_node, env) - 1
