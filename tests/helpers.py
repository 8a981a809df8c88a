"""Helpers the test modules share (fixtures stay in ``conftest.py``): composed configs, one finished small run, CLI
runs, free ports, a quiet CPU Trainer, simulated SLURM tasks, a spy on file-system calls."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SLURM_2_TASKS = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
                 "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "localhost"}


def compose_fast(tmp_path, *overrides: str):
    """The train config with the `debug=fast` overlay, writing everything under ``tmp_path``."""
    from popstack.pipeline.config import compose_config

    return compose_config(["debug=fast", f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run", *overrides])


def finished_run(tmp_path_factory, name: str, *overrides: str) -> tuple[Path, Path]:
    """(run dir, data root) of one finished ``debug=fast`` run with ``overrides`` in a fresh folder ``name``."""
    from popstack import train

    cfg = compose_fast(tmp_path_factory.mktemp(name), *overrides)
    train(cfg)
    return Path(cfg.run_dir), Path(cfg.data.root)


def spy_file_calls(monkeypatch, calls) -> list[str]:
    """Record the path of every call to ``calls`` ((module, function name) pairs, e.g. ``(os, "stat")``) until
    ``monkeypatch.undo()``; returns the list the paths are appended to."""
    touched: list[str] = []
    for module, name in calls:
        real = getattr(module, name)

        def spy(path, *args, _real=real, **kwargs):
            touched.append(str(path))
            return _real(path, *args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    return touched


def run_cli(script: str, *args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python <script> args...`` in a subprocess (offline W&B, the repository on the path)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT / --master_port of a launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_trainer(**kwargs):
    """A CPU ``lightning.Trainer`` without logger, checkpoints, progress bar or model summary; ``kwargs`` add or
    override arguments."""
    import lightning as L

    return L.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, **kwargs})


def slurm_task(procid: int, localid: int | None = None, node: int = 0, ntasks: int = 2) -> dict[str, str]:
    """The environment ``srun`` gives task ``procid`` of a ``ntasks``-task job."""
    return {**SLURM_2_TASKS, "SLURM_NTASKS": str(ntasks), "SLURM_NODEID": str(node), "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid if localid is None else localid)}


def module_args(name: str, **values) -> dict:
    """Constructor arguments of the registered neural module ``name``: its config's defaults (the dataclass of its
    spec) with ``values`` (config keys or other constructor arguments: embed_dim, backbone_name, ...), limited to
    what the constructor takes; ``token_len`` 32 unless given."""
    import dataclasses
    import inspect

    from popstack.lightning_modules.registry import module_spec

    spec = module_spec(name)
    keys = {f.name for f in dataclasses.fields(spec.config)}
    config = spec.config_of(**{k: v for k, v in values.items() if k in keys})
    params = inspect.signature(spec.module.__init__).parameters
    args = {"token_len": 32, **{k: getattr(config, k) for k in keys if k in params},
            **{k: v for k, v in values.items() if k not in keys}}
    return {k: v for k, v in args.items() if k in params}
