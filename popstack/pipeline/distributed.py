"""The one place that knows the process topology: which process this is among how many, and who goes first.

Launchers and what they set (read in this order; the first that applies wins):

    torchrun / torch.distributed.run   RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK (node)   every process at once
    SLURM (srun, one task per device)  SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID   every task at once
    Lightning's own launcher           LOCAL_RANK, NODE_RANK, WORLD_SIZE in the processes it starts; the first
                                       process has none of them until its first ``Trainer`` starts the others
    nothing                            one process: rank 0 of 1

SLURM is read only when Lightning would read it too (``SLURM_NTASKS`` set and the job not an interactive
``bash``/``interactive`` allocation), so a plain ``python train.py`` inside ``salloc`` stays one process.

Every "first process only" decision of ``train.py``/``predict.py`` asks ``topology().is_zero``. Processes
other than the first wait for what the first one writes: ``wait_for`` polls a condition (used before a process
group exists, e.g. for stage manifests) and fails after a timeout with an error naming what it waited for;
``barrier`` synchronises the ranks once Lightning has created the process group.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

from popstack.pipeline.errors import UserError

T = TypeVar("T")

#: Environment variable through which the first process hands its shared temporary directory to the processes
#: Lightning starts (they re-run the command line and would otherwise make a directory of their own).
SHARED_TMP_ENV = "POPSTACK_SHARED_TMP"
#: Key of the launch id in torchrun's agent store, and how long a rank waits for rank 0 to put it there (no config
#: is read at that point; rank 0 puts it there as soon as it starts, so this only bounds a launch that never comes).
STORE_KEY = "popstack/launch_id"
STORE_TIMEOUT_S = 6 * 3600.0


@dataclass(frozen=True)
class Topology:
    """This process among all of the launch: ``rank`` (global, 0..world_size-1), ``local_rank`` (on its node),
    ``world_size`` (processes in all), ``node_rank``, ``launcher`` (torchrun | slurm | lightning | single),
    ``launch`` (a label of the launch from the environment) and ``store`` (torchrun's agent store, host and port,
    when it serves one: ``launch_id`` then agrees on a fresh random id through it)."""

    rank: int
    local_rank: int
    world_size: int
    node_rank: int
    launcher: str
    launch: str = ""
    store: tuple[str, int] | None = None

    @property
    def launch_id(self) -> str:
        """The same string in every process of one launch and a different one in the next launch ("" single).

        SLURM: job and step id; Lightning: the address and port its processes share; torchrun: a random id that
        rank 0 puts in the agent's store (its run id is "none" unless ``--rdzv-id``/``--standalone`` is given).
        Files that ranks leave for each other carry it, so those of an interrupted launch are never taken as new.
        """
        if self.store is None:
            return self.launch
        return f"{self.launch}-{_store_nonce(*self.store, self.rank == 0)}"

    @property
    def is_zero(self) -> bool:
        """Whether this is the first process (the one that runs the single-process stages and writes results)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise UserError(f"environment variable {name} is not set (needed to tell this process's rank)")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def slurm_launched(env: Mapping[str, str]) -> bool:
    """Whether the tasks were started by ``srun`` (Lightning's rule: SLURM_NTASKS set, job not interactive)."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def topology(env: Mapping[str, str] | None = None, devices_per_node: int | None = None) -> Topology:
    """The topology of this process from its environment (``os.environ`` by default).

    ``devices_per_node`` is only needed for processes started by Lightning on nodes above 0 (their global rank is
    ``node_rank * devices_per_node + local_rank``); without it the number of processes per node is taken as
    ``world_size`` (one node).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or any launcher following its convention)
        node = env.get("GROUP_RANK", env.get("NODE_RANK", "0"))
        launch = env.get("TORCHELASTIC_RUN_ID") or f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
        store = (env["MASTER_ADDR"], _int(env, "MASTER_PORT")) \
            if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in env else None
        return Topology(_int(env, "RANK"), _int(env, "LOCAL_RANK", 0), _int(env, "WORLD_SIZE"), int(node),
                        "torchrun", f"torchrun-{launch}", store)
    if slurm_launched(env):
        launch = f"slurm-{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}"
        return Topology(_int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID", 0), _int(env, "SLURM_NTASKS"),
                        _int(env, "SLURM_NODEID", 0), "slurm", launch)
    if "LOCAL_RANK" in env:  # a process started by Lightning (or the first one, after its first Trainer)
        local, node = _int(env, "LOCAL_RANK"), _int(env, "NODE_RANK", 0)
        world = _int(env, "WORLD_SIZE", 1)
        per_node = devices_per_node or world
        launch = f"lightning-{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
        return Topology(node * per_node + local, local, world, node, "lightning", launch)
    node = _int(env, "NODE_RANK", 0)  # the first process of a node before Lightning started any other
    return Topology(node * (devices_per_node or 1), 0, 1, node, "single")


#: ``trainer.accelerator`` values that mean a CUDA device when one is present.
CUDA_ACCELERATORS = ("gpu", "cuda", "auto")


def _device_ids(devices, count: int) -> list[int]:
    """The CUDA device indices ``trainer.devices`` selects, as Lightning reads it: a list or a "0,2" string names
    them, a number n takes the first n, -1 / "-1" / "auto" take every visible device."""
    if isinstance(devices, str) and "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    if isinstance(devices, Sequence) and not isinstance(devices, str):  # a list (or Hydra's ListConfig)
        return [int(d) for d in devices]
    if devices in (None, "auto", -1, "-1"):
        return list(range(count))
    return list(range(int(devices)))


def rank_device(accelerator: str, devices=None, env: Mapping[str, str] | None = None):
    """The ``torch.device`` this process computes on outside a ``Trainer`` (the embedding cache, sentence
    embeddings), made the current CUDA device: ``cuda:<i>`` where ``i`` is the device Lightning gives this local
    rank (the ``local_rank``-th of ``trainer.devices``), so the N processes of a node use N GPUs, not GPU 0; the
    CPU when the accelerator asks for none or no GPU is visible. Call it before the first Trainer or CUDA work of
    the process (``torch.cuda.set_device`` then keeps every plain ``"cuda"`` tensor on this rank's GPU too).

    Raises ``UserError`` when this local rank has no device (more processes on the node than GPUs selected)."""
    import torch

    if str(accelerator) not in CUDA_ACCELERATORS or not torch.cuda.is_available():
        return torch.device("cpu")
    topo = topology(env)
    ids = _device_ids(devices, torch.cuda.device_count())
    if topo.local_rank >= len(ids):
        raise UserError(f"local rank {topo.local_rank} has no GPU: trainer.devices={devices!r} selects {len(ids)} "
                        f"of the {torch.cuda.device_count()} visible (run one process per selected GPU)")
    index = ids[topo.local_rank]
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def planned_world_size(trainer: Mapping, env: Mapping[str, str] | None = None) -> int:
    """How many processes train together under the ``trainer`` config section (accelerator, devices, num_nodes)
    in this environment: the launcher's world size under torchrun or SLURM, else devices x nodes as Lightning
    will start them (on GPUs, the devices ``trainer.devices`` selects among the visible ones). The fit key and the
    neural stage's hash record it: a model trained on 1 device is not reused as if trained on 8."""
    import torch

    topo = topology(env)
    if topo.launcher in ("torchrun", "slurm"):
        return topo.world_size
    from popstack.pipeline.training import trainer_setting

    devices = trainer_setting(trainer, "devices")
    if str(trainer_setting(trainer, "accelerator")) in CUDA_ACCELERATORS and torch.cuda.is_available():
        per_node = len(_device_ids(devices, torch.cuda.device_count()))
    else:  # CPU: "auto" is one process, a number n starts n
        per_node = 1 if devices in (None, "auto", -1, "-1") else len(_device_ids(devices, 1))
    return per_node * int(trainer_setting(trainer, "num_nodes") or 1)


def start_lightning_processes(trainer: Mapping) -> bool:
    """Under Lightning's own launcher, start the other processes now rather than at the first ``Trainer``, so the
    work before it (the embedding cache) is split across the ranks too; True when processes were started.

    Only the first process of a launch that is neither torchrun nor SLURM, with a ``trainer`` section that starts
    several processes through Lightning's script launcher (``strategy: ddp``); ``ddp_spawn`` and friends start
    theirs inside the Trainer and keep doing so. The processes started re-run the command line with ``LOCAL_RANK``
    etc. set (``topology`` reads them); the later Trainers of this process see those variables and start no more."""
    if topology().launcher != "single" or planned_world_size(trainer) < 2:
        return False
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    from popstack.pipeline.training import make_trainer

    launcher = make_trainer(trainer, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False).strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher):
        return False
    launcher.launch(lambda: None)
    return True


def wait_timeout(cfg) -> float:
    """Seconds a rank waits for rank 0's files: the run config's ``rank_wait_s``."""
    return float(cfg.rank_wait_s)


@functools.lru_cache(maxsize=None)
def _store_nonce(host: str, port: int, first: bool) -> str:
    """A random id that the first process writes to torchrun's agent store and every process reads back."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    try:
        store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S),
                         wait_for_workers=False)
        if first:
            store.set(STORE_KEY, uuid.uuid4().hex)
        return store.get(STORE_KEY).decode()
    except RuntimeError as err:  # torch raises its DistStoreError (a RuntimeError) on timeouts and refusals
        raise UserError(f"cannot agree on a launch id through torchrun's store at {host}:{port}: {err}") from err


def is_rank_zero() -> bool:
    """Shorthand for ``topology().is_zero``."""
    return topology().is_zero


def wait_for(condition: Callable[[], T | None], what: str, timeout_s: float,
             poll_s: float = 0.5) -> T:
    """Poll ``condition()`` until it returns something other than None/False, and return that.

    Raises ``UserError`` after ``timeout_s`` seconds, naming ``what`` was awaited (e.g. "manifests/prepare.json
    written by rank 0"): rank 0 failed, or is slower than the timeout allows.
    """
    start = time.monotonic()
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() - start > timeout_s:
            topo = topology()
            raise UserError(f"rank {topo.rank} of {topo.world_size} waited {timeout_s:.0f} s for {what}; rank 0 "
                            f"has failed or is still working (see its log); raise rank_wait_s if it is slow")
        time.sleep(poll_s)


def barrier() -> None:
    """Synchronise every rank when a process group exists (after Lightning's first Trainer); otherwise nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def shared_tmpdir(parent: str | Path | None, timeout_s: float) -> Iterator[Path]:
    """One temporary directory for every rank of the launch (rank files written into it merge by post id).

    Rank 0 creates it (in ``parent``; None: the system temporary folder) and removes it at exit; it publishes the
    path in ``POPSTACK_SHARED_TMP`` for the processes Lightning starts later. Under torchrun/SLURM, where all
    processes start together, the name derives from the launch id, so every rank finds the same directory; the
    others wait for rank 0 to create it and never remove it.
    """
    topo = topology()
    inherited = os.environ.get(SHARED_TMP_ENV)
    if inherited and not topo.is_zero:
        path = Path(inherited)
    elif topo.distributed:
        base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        path = base / f"popstack-{''.join(c if c.isalnum() else '-' for c in topo.launch_id)}"
        if topo.is_zero:
            path.mkdir(parents=True, exist_ok=True)
            (path / ".ready").touch()
        else:
            wait_for(lambda: (path / ".ready").is_file(), f"the shared temporary directory {path}", timeout_s)
    else:
        base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="popstack-", dir=base))
    previous = os.environ.get(SHARED_TMP_ENV)
    if topo.is_zero:
        os.environ[SHARED_TMP_ENV] = str(path)
    try:
        yield path
    finally:
        barrier()  # every rank is done with the directory before rank 0 removes it
        if topo.is_zero:
            shutil.rmtree(path, ignore_errors=True)
            if previous is None:
                os.environ.pop(SHARED_TMP_ENV, None)
            else:
                os.environ[SHARED_TMP_ENV] = previous
