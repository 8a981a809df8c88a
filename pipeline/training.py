"""Fit one LightningModule into its own directory, resumably.

Layout of ``out_dir``: ``checkpoints/last.ckpt`` (every epoch, atomic), ``checkpoints/best.ckpt`` (best validation
score), ``csv/`` (CSVLogger), ``done.json`` (written when fit finished). A rerun with ``done.json`` present does
nothing; a rerun with only ``last.ckpt`` resumes from it, with the RNG states saved in the checkpoint, so the
result equals an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("popstack")

DONE = "done.json"


def quiet_lightning() -> None:
    """Lightning sets its loggers to INFO on import (tips, device summaries); keep warnings only."""
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary name in the same directory, then rename it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class RNGState(Callback):
    """Store the torch/numpy/python RNG states in every checkpoint and restore them on resume.

    States are kept as tensors, lists and ints so checkpoints still load with ``torch.load(weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, py_state, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(py_state), gauss],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))


#: Trainer defaults of the pipeline that the ``trainer`` config section may override.
TRAINER_DEFAULTS: dict[str, Any] = {"num_sanity_val_steps": 0, "enable_model_summary": False}


def trainer_kwargs(trainer_cfg: dict[str, Any], **pipeline_owned: Any) -> dict[str, Any]:
    """``lightning.Trainer`` arguments: the pipeline defaults, then every key of ``trainer_cfg`` (already checked
    against the Trainer's signature by ``pipeline.schema``), then the arguments the pipeline sets itself."""
    clash = sorted(set(trainer_cfg) & set(pipeline_owned))
    if clash:
        raise ValueError(f"trainer config sets {clash}, which the pipeline sets itself")
    return {**TRAINER_DEFAULTS, **trainer_cfg, **pipeline_owned}


def fit_resumable(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    out_dir: Path,
    *,
    trainer_cfg: dict[str, Any],
    max_epochs: int,
    monitor: str,
    mode: str,
    seed: int,
    wandb_prefix: str | None = None,
    progress_bar: bool = True,
    early_stopping_patience: int | None = None,
) -> Path:
    """Fit ``module`` (or resume it) and return the path of the best checkpoint.

    ``trainer_cfg``: the config's ``trainer`` section, any ``lightning.Trainer`` arguments (see ``trainer_kwargs``);
    ``early_stopping_patience``: stop after this many validations without improvement of ``monitor`` (None = off).
    """
    out_dir = Path(out_dir)
    done = out_dir / DONE
    if done.is_file():
        return Path(json.loads(done.read_text())["best"])
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume = last if last.is_file() else None
    if resume is not None:
        log.info("resuming %s from %s", out_dir.name, resume)
    L.seed_everything(seed, workers=True, verbose=False)
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1, save_last=True,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    loggers: list = [CSVLogger(str(out_dir), name="csv", version="")]
    callbacks: list = [checkpoint, RNGState(), LearningRateMonitor(logging_interval="epoch")]
    if early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=int(early_stopping_patience)))
    if wandb_prefix is not None:
        from pipeline.tracking import model_job_logger

        job = model_job_logger(wandb_prefix)  # one W&B run per model fold, in the pipeline's group
        if job is not None:
            loggers.append(job[0])
            callbacks.append(job[1])
    trainer = L.Trainer(**trainer_kwargs(trainer_cfg, max_epochs=max_epochs, logger=loggers, callbacks=callbacks,
                                         plugins=[AtomicCheckpointIO()], enable_progress_bar=progress_bar,
                                         default_root_dir=str(out_dir)))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else last
    if trainer.is_global_zero:
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps({"best": str(best), "best_score": _float(checkpoint.best_model_score),
                                   "epochs": trainer.current_epoch}))
        os.replace(tmp, done)
    trainer.strategy.barrier()  # the other ranks read done.json next
    return best


def _float(value) -> float | None:
    return None if value is None else float(value)
