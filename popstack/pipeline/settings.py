"""The pipeline's own config groups as typed configs (``datamodules.typed``): ``logger/`` and ``paths/``.

Each dataclass holds the group's defaults and rules; ``configs/<group>/<name>.yaml`` holds only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from popstack.datamodules.typed import setting


@dataclass
class WandbConfig:
    """enabled: log to Weights & Biases at all. mode: online (needs ``WANDB_API_KEY`` or ``~/.netrc``; without one
    the run logs offline), offline (``wandb sync <run_dir>/wandb/offline-run-*`` uploads later) or disabled.
    project, entity (null: the account's default), group (null: one per run directory), tags. The environment
    (``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_RUN_GROUP``, ``WANDB_TAGS``) wins over these."""

    enabled: bool = setting(True)
    mode: str = setting("offline", choices=("online", "offline", "disabled"))
    project: str = setting("popstack")
    entity: str | None = setting(None)
    group: str | None = setting(None)
    tags: list[str] = setting([])


@dataclass
class LoggerConfig:
    """Experiment tracking (``popstack/pipeline/tracking.py``)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PathsConfig:
    """Root folders. root_dir: the base of the two others. data_dir: data the demo generates, cached and reused
    across runs. output_dir: where each run's directory is made (``hydra.run.dir``)."""

    root_dir: str = setting(".")
    data_dir: str = setting("${paths.root_dir}/data")
    output_dir: str = setting("${paths.root_dir}/outputs")
