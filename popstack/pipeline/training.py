"""Fit one LightningModule into its own directory, resumably, keyed by what produces it.

Layout of ``out_dir``: ``key.json`` (what the fit is made of: data, fold assignment, model config, backbone
weights, the world size it trains on; written before training), ``checkpoints/last.ckpt`` (every epoch, atomic),
``checkpoints/best.ckpt`` (best validation score), ``csv/`` (CSVLogger), ``done.json`` (written when fit finished;
``best`` is relative to ``out_dir``). A rerun with the same key and a ``done.json`` whose checkpoint exists does
nothing; with the same key and only ``last.ckpt`` it resumes from it, with the RNG states saved in the checkpoint,
so the result equals an uninterrupted run with the same seed. A different key (new folds, config, weights or world
size) starts from scratch.
Checkpoints are read with ``torch.load(weights_only=True)`` always, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
says: a file that is not a plain tensor checkpoint is refused with a ``UserError`` naming it.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from popstack.datamodules.atomic import atomic_path, atomic_write_json
from popstack.datamodules.progress import progress_mode

log = logging.getLogger("popstack")

DONE = "done.json"
KEY_FILE = "key.json"


def quiet_lightning() -> None:
    """Lightning sets its loggers to INFO on import (tips, device summaries); keep warnings only."""
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


#: Stands for the checkpoint's own directory in the paths callbacks store in it (ModelCheckpoint's dirpath and
#: best/last paths), so a checkpoint names no absolute path and a moved run resumes with its best-model record.
CHECKPOINT_DIR = "<checkpoint-dir>"


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically (``datamodules.atomic``) with callback paths relative to the checkpoint's
    directory, and read back with an explicit ``weights_only=True`` (tensors, containers and primitives only: a
    planted pickle never runs)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        here = os.path.realpath(Path(path).parent)
        checkpoint = {**checkpoint, "callbacks": _swap_prefix(checkpoint.get("callbacks", {}), here, CHECKPOINT_DIR)}
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        checkpoint = load_checkpoint_safely(path)
        here = os.path.realpath(Path(path).parent)
        checkpoint["callbacks"] = _swap_prefix(checkpoint.get("callbacks", {}), CHECKPOINT_DIR, here)
        return checkpoint


def _swap_prefix(obj: Any, old: str, new: str) -> Any:
    """``obj`` with every string (values and dict keys) equal to ``old`` or under ``old/`` re-rooted at ``new``."""
    if isinstance(obj, dict):
        return {_swap_prefix(k, old, new): _swap_prefix(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap_prefix(v, old, new) for v in obj)
    if isinstance(obj, str) and (obj == old or obj.startswith(old + "/")):
        return new + obj[len(old):]
    return obj


def load_checkpoint_safely(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU; anything else than a tensor checkpoint -> ``UserError``."""
    from popstack.pipeline.errors import UserError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UserError(f"checkpoint not found: {path}") from err
    except Exception as err:  # UnpicklingError for code, RuntimeError/EOFError for damaged files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a plain tensor checkpoint ({type(err).__name__}: {reason[:200]})") from err


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
#: Trainer arguments that say where and how visibly a fit runs, not what it computes: changing them reuses the
#: trained models, unless the number of processes changes (devices x nodes: the fit key records
#: ``pipeline.distributed.planned_world_size``, since each device trains on its share of the global batch).
#: Every other ``trainer`` key (precision, gradient clipping, accumulation, ...) retrains.
PLACEMENT_TRAINER_ARGS = frozenset({"accelerator", "devices", "num_nodes", "strategy", "log_every_n_steps",
                                    "enable_model_summary", "profiler", "barebones"})


def result_trainer_args(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``trainer`` keys that change what a fit computes (all but ``PLACEMENT_TRAINER_ARGS``)."""
    return {k: v for k, v in trainer_cfg.items() if k not in PLACEMENT_TRAINER_ARGS}


def trainer_kwargs(trainer_cfg: Mapping[str, Any], **pipeline_owned: Any) -> dict[str, Any]:
    """``lightning.Trainer`` arguments: the pipeline defaults, then every key of ``trainer_cfg`` (already checked
    against the Trainer's signature by ``pipeline.schema``), then the arguments the pipeline sets itself."""
    if isinstance(trainer_cfg, DictConfig):
        trainer_cfg = OmegaConf.to_container(trainer_cfg, resolve=True)
    clash = sorted(set(trainer_cfg) & set(pipeline_owned))
    if clash:
        raise ValueError(f"trainer config sets {clash}, which the pipeline sets itself")
    return {**TRAINER_DEFAULTS, **trainer_cfg, **pipeline_owned}


def make_trainer(trainer_cfg: Mapping[str, Any], **pipeline_owned: Any) -> L.Trainer:
    """The one builder of every ``lightning.Trainer`` of the pipeline (each fold's fit, each fold's prediction, the
    launcher that starts Lightning's processes): the config's ``trainer`` section as a whole, so a key such as
    ``trainer.precision``, ``trainer.strategy`` or ``trainer.num_nodes`` means the same for fit and prediction
    (keys that only concern fitting, e.g. ``gradient_clip_val``, are ignored by ``Trainer.predict``).
    ``pipeline_owned``: the arguments the caller sets itself (``schema.PIPELINE_OWNED_TRAINER_ARGS``: logger,
    callbacks, progress bar, epochs, ...); the config may not set them too."""
    return L.Trainer(**trainer_kwargs(trainer_cfg, **pipeline_owned))


def trainer_setting(trainer_cfg: Mapping[str, Any], key: str) -> Any:
    """The value ``make_trainer`` gives the Trainer argument ``key``: the config's, else the pipeline's default
    (``TRAINER_DEFAULTS``), else ``lightning.Trainer``'s own (read from its signature, not written here again)."""
    if key in trainer_cfg:
        return trainer_cfg[key]
    if key in TRAINER_DEFAULTS:
        return TRAINER_DEFAULTS[key]
    return inspect.signature(L.Trainer).parameters[key].default


def read_done(out_dir: Path) -> dict | None:
    """``done.json`` of a finished fit (``best``: the best checkpoint relative to ``out_dir``, ``best_score``,
    ``epochs``); None when the fit has not finished (no file, or a damaged one). The one reader of that file."""
    try:
        done = json.loads((Path(out_dir) / DONE).read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and isinstance(done.get("best"), str) else None


def finished_checkpoint(out_dir: Path) -> Path | None:
    """The best checkpoint recorded in ``out_dir/done.json`` when it exists, else None (not finished)."""
    done = read_done(out_dir)
    best = None if done is None else Path(out_dir) / done["best"]
    return best if best is not None and best.is_file() else None


def recorded_key_is(key_file: Path, key: Any) -> bool:
    """True when ``key_file`` holds ``key`` (as ``atomic_write_json`` wrote it); False if absent or damaged."""
    try:
        return json.loads(Path(key_file).read_text()) == json.loads(json.dumps(key, sort_keys=True, default=str))
    except (OSError, ValueError):
        return False


def start_fresh_unless(out_dir: Path, key: dict[str, Any]) -> None:
    """Keep ``out_dir`` (finished or resumable) only when it was made with ``key``; otherwise empty it and
    record ``key``. A ``done.json`` pointing at no checkpoint also empties it (the fit starts again)."""
    out_dir = Path(out_dir)
    key_file = out_dir / KEY_FILE
    if recorded_key_is(key_file, key):
        if not (out_dir / DONE).is_file() or finished_checkpoint(out_dir) is not None:
            return
        log.info("%s: done.json names a checkpoint that is gone; training from scratch", out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()):
        log.info("%s: made from other data, folds, config or weights; training from scratch", out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    atomic_write_json(key_file, key)


class EpochLog(Callback):
    """One ``popstack`` log line per finished epoch (the monitored value when logged): the training's progress where
    a bar would garble a captured log (``datamodules.progress``)."""

    def __init__(self, name: str, max_epochs: int, monitor: str):
        self.name, self.max_epochs, self.monitor = name, max_epochs, monitor

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            shown = "" if value is None else f", {self.monitor}={float(value):.4f}"
            log.info("%s: epoch %d/%d done%s", self.name, trainer.current_epoch + 1, self.max_epochs, shown)


def user_callbacks(callbacks_cfg) -> list:
    """The config's ``callbacks`` section (name -> ``_target_`` entry, null = off) built with Hydra's
    ``instantiate``: fresh objects for every fit. A target that cannot be built is a ``UserError``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from popstack.pipeline.errors import UserError

    out = []
    for name, node in (callbacks_cfg or {}).items():
        if node is None:
            continue
        try:
            out.append(instantiate(node))
        except InstantiationException as err:
            raise UserError(f"callbacks.{name}: cannot build {node.get('_target_')}: "
                            f"{' '.join(str(err).split())}") from err
    return out


def fit_resumable(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    out_dir: Path,
    *,
    key: dict[str, Any] | None = None,
    trainer_cfg: dict[str, Any],
    max_epochs: int,
    monitor: str | None,
    mode: str,
    seed: int,
    wandb_prefix: str | None = None,
    progress_bar: bool = True,
    early_stopping_patience: int | None = None,
    extra_callbacks: list | None = None,
) -> Path:
    """Fit ``module`` (or resume it) and return the path of the best checkpoint.

    ``trainer_cfg``: the config's ``trainer`` section, any ``lightning.Trainer`` arguments (see ``make_trainer``);
    ``monitor``: the metric that picks the best checkpoint (None: the last epoch's); ``early_stopping_patience``: stop
    after this many validations without improvement of ``monitor`` (None = off).
    ``extra_callbacks``: Lightning callbacks added to the pipeline's own (the config's ``callbacks``,
    ``user_callbacks``).
    ``key``: JSON-serialisable description of everything the fit depends on (see the module docstring); a
    directory made with another key starts afresh. None: no key is recorded or checked (a caller-owned folder).
    Raises ``UserError`` when ``max_epochs`` < 1 or the fit ended without writing a checkpoint.
    """
    from popstack.pipeline.errors import UserError

    out_dir = Path(out_dir)
    if max_epochs < 1:
        raise UserError(f"{out_dir}: epochs must be at least 1 to train a model (got {max_epochs})")
    if key is not None:
        start_fresh_unless(out_dir, key)
    best = finished_checkpoint(out_dir)
    if best is not None:
        return best
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
    if progress_mode(progress_bar) == "log":  # no bar in a captured log: one line per epoch instead
        callbacks.append(EpochLog(out_dir.parent.name + "/" + out_dir.name, max_epochs, monitor))
    callbacks.extend(extra_callbacks or [])
    if wandb_prefix is not None:
        from popstack.pipeline.tracking import model_job_logger

        job = model_job_logger(wandb_prefix, monitor, mode, resume=resume is not None)  # one run per model fold
        if job is not None:
            loggers.append(job[0])
            callbacks.append(job[1])
    trainer = make_trainer(trainer_cfg, max_epochs=max_epochs, logger=loggers, callbacks=callbacks,
                           plugins=[SafeCheckpointIO()],
                           enable_progress_bar=progress_mode(progress_bar) == "bar",  # not in a log
                           default_root_dir=str(out_dir))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else last
    if not best.is_file():
        raise UserError(f"{out_dir}: training ended without a checkpoint ({best} was not written)")
    if trainer.is_global_zero:
        atomic_write_json(out_dir / DONE, {"best": best.resolve().relative_to(out_dir.resolve()).as_posix(),
                                           "best_score": _float(checkpoint.best_model_score),
                                           "epochs": trainer.current_epoch})
    trainer.strategy.barrier()  # the other ranks read done.json next
    return best


def _float(value) -> float | None:
    return None if value is None else float(value)
