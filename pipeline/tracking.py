"""Weights & Biases for the whole pipeline: one run per run directory, offline unless configured online.

Lightning's ``WandbLogger`` reuses the active run (so every fold's training curves land in it, under a
per-model/per-fold prefix). Checkpoints and the submission go up as artifacts with ``wandb.log_artifact``,
which works offline and syncs later (``WandbLogger(offline=True)`` refuses ``log_model``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

SECRET_MARKERS = ("key", "token", "secret", "password")


def _public_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as a dict with anything secret-looking removed (W&B config is visible to collaborators)."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items() if not any(m in str(k).lower() for m in SECRET_MARKERS)}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(OmegaConf.to_container(cfg, resolve=True))


class Tracker:
    """Thin wrapper: no-ops when W&B is disabled, so stage code never branches on it."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.enabled = bool(cfg.logger.wandb.enabled)
        self.run = None
        if not self.enabled:
            return
        import wandb

        mode = cfg.logger.wandb.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            mode = "offline"  # no account configured: keep working, sync later
        os.environ.setdefault("WANDB_SILENT", "true")
        run_id_file = run_dir / "wandb_run_id.txt"
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else uuid.uuid4().hex[:8]
        run_id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.logger.wandb.project, entity=cfg.logger.wandb.entity, dir=str(run_dir), mode=mode,
            id=run_id, resume="allow", name=f"{cfg.name}-{run_dir.name}", tags=list(cfg.logger.wandb.tags),
            config=_public_config(cfg), reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def table(self, key: str, df: pd.DataFrame) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(dataframe=df.reset_index(drop=True))})

    def image(self, key: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def artifact(self, name: str, kind: str, paths: list[Path], base: Path) -> None:
        """Log files/folders as one artifact; entries are named by their path relative to ``base``."""
        if self.run is not None:
            import wandb

            art = wandb.Artifact(name=name, type=kind)
            for p in paths:
                rel = str(p.relative_to(base))
                if p.is_dir():
                    art.add_dir(str(p), name=rel)
                elif p.is_file():
                    art.add_file(str(p), name=rel)
            self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
