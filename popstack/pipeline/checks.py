"""Checks before anything is written: what can be known from the config, the run directory and the inputs up front.

``pipeline.driver`` calls ``check_plan`` and ``check_data_root`` before it creates or locks the run directory; the
prepare stage calls ``check_labelled`` and ``check_free_space`` right after reading the raw data, before it writes
anything. Each failure is one ``UserError``: a failed or refused rerun leaves the run directory as it was.

    check_plan(cfg, layout)           # stages=[...] needs finished upstream stages; a finished stage left out of
                                      # stages=[...] must keep the config it ran with
    check_data_root(cfg)              # the data source's cheap look (an SMPD root holds train metadata), before hashing
    folds = check_labelled(posts, cfg)   # finite, bounded, varying labels; enough posts and users for the folds
    check_free_space(run_dir, image_bytes, n_posts, cfg)
    probe_writable(path)              # a file can really be created beside ``path`` (``--out /proc/x.json``)
    disk_full(err)                    # an exception that means "no space left on the device"
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from popstack.datamodules.schema import LABEL, NO_FOLD
from popstack.pipeline.errors import UserError
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import Manifest, config_hash

#: What torch's serializer says when a write fails (``torch.save`` on a full disk names no errno).
TORCH_WRITE_FAILURES = ("No space left on device", "file write failed", "PytorchStreamWriter failed writing")


def downstream(stage: str) -> list[str]:
    """Every stage that reads ``stage``'s outputs, directly or through another stage, in registry order."""
    from popstack.pipeline.stages import STAGES

    found = {stage}
    for s in STAGES:
        if any(dep in found for dep in s.depends):
            found.add(s.name)
    return [s.name for s in STAGES if s.name in found and s.name != stage]


def finished(layout: RunLayout, stage: str) -> Manifest | None:
    return Manifest.read(layout.manifest(stage))


def check_plan(cfg: DictConfig, layout: RunLayout) -> None:
    """Refuse, before anything is written, a ``stages=[...]`` that cannot run or would leave the run inconsistent:
    a stage whose upstream stage neither runs now nor has finished, or a finished stage left out of ``stages``
    whose config section this config changes (``config.yaml`` would then describe outputs it did not make)."""
    from popstack.pipeline.stages import STAGES

    container = OmegaConf.to_container(cfg, resolve=True)
    wanted = list(cfg.stages)
    for stage in STAGES:
        if stage.name in wanted:
            for dep in stage.depends:
                if dep not in wanted and finished(layout, dep) is None:
                    raise UserError(f"stage {stage.name!r} needs the outputs of {dep!r}, which has not run in "
                                    f"{layout.root}; add it to stages=[...]")
            continue
        manifest = finished(layout, stage.name)
        if manifest is not None and manifest.config is not None \
                and manifest.config != config_hash(stage.config(container)):
            raise UserError(f"stage {stage.name!r} finished in {layout.root} with another config than this one, "
                            f"and stages={wanted} leaves it out; add it to stages=[...] (or use another "
                            f"hydra.run.dir) so the run's config.yaml keeps describing its outputs")


def refuse_stale_downstream(cfg: DictConfig, layout: RunLayout, stage: str, why: str) -> None:
    """Called before ``stage`` reruns: refuse when finished stages that read it are left out of ``stages=[...]``
    (they would keep outputs computed from what this rerun replaces)."""
    left = [name for name in downstream(stage) if name not in cfg.stages and finished(layout, name) is not None]
    if left:
        raise UserError(f"stage {stage!r} would rerun ({why}), but the finished stages {left} that read its "
                        f"outputs are not in stages={list(cfg.stages)}; add them (or use another hydra.run.dir)")


def check_data_root(cfg: DictConfig) -> None:
    """The data source's cheap look at its data (``DataSource.check``; e.g. an SMPD root must be a directory
    holding train metadata): before it is fingerprinted, so a mistyped ``data.root=/usr`` fails at once instead of
    after hashing the whole tree."""
    from popstack.datamodules.sources import get_source

    get_source(str(cfg.data.kind)).check(cfg.data)


def check_labelled(posts: pd.DataFrame, cfg: DictConfig) -> pd.DataFrame:
    """The fold table of ``posts``, after checking what the later stages need of the labels (each failure would
    otherwise come hours later, in CatBoost or BatchNorm): finite labels within ``checks.label_abs_max``, not all
    equal, enough labelled posts and users for ``n_folds`` folds, at least ``checks.min_fit_posts`` training posts
    in every fold's fit."""
    from popstack.datamodules.folds import fold_table

    labels = posts.loc[posts.split == "train", LABEL].dropna().to_numpy(dtype=np.float64)
    limit = float(cfg.checks.label_abs_max)
    big = np.abs(labels) > limit
    if big.any() or not np.isfinite(labels).all():
        worst = labels[~np.isfinite(labels) | big][0]
        raise UserError(f"train labels: {worst!r} is beyond checks.label_abs_max={limit:g} (SMPD labels are "
                        f"log-views); fix the label file or raise the limit")
    if len(labels) and np.ptp(labels) == 0:
        raise UserError(f"train labels: all {len(labels)} labels equal {labels[0]:g}; nothing to learn")
    n_folds, strategy = int(cfg.n_folds), str(cfg.folds.strategy)
    if strategy == "user":
        users = posts.loc[posts[LABEL].notna(), "uid"].nunique()
        if users < n_folds:
            raise UserError(f"folds.strategy=user needs at least n_folds={n_folds} users with labelled posts; "
                            f"the data has {users}")
    try:
        folds = fold_table(posts, n_folds, int(cfg.seed), strategy, float(cfg.folds.holdout_fraction))
    except ValueError as err:
        raise UserError(f"folds (n_folds={n_folds}, folds.strategy={strategy}): {err}") from None
    fold = folds["fold"].to_numpy()
    need = int(cfg.checks.min_fit_posts)
    for k in range(n_folds):
        fit = int(((fold != NO_FOLD) & (fold != k)).sum())
        if fit < need:
            raise UserError(f"n_folds={n_folds}: fold {k}'s fit has {fit} labelled posts, fewer than "
                            f"checks.min_fit_posts={need}; use fewer folds or more labelled posts")
    return folds


def cache_bytes_per_post(cfg: DictConfig) -> int:
    """Bytes the embedding cache holds per post (``lightning_modules.embed.CACHE_ARRAYS``), from the open_clip
    config of ``backbone.name``; 0 when the model's dimensions are not known without loading it."""
    try:
        import open_clip

        import popstack.lightning_modules.backbone  # noqa: F401  (registers the shipped model configs)

        dim = int(open_clip.get_model_config(str(cfg.backbone.name))["embed_dim"])
    except Exception:  # an unknown name is the backbone check's business, not this estimate's
        return 0
    tokens = int(cfg.backbone.token_len)
    return 2 * 4 * dim + tokens * 2 * dim + tokens + 1


def check_free_space(run_dir: Path, image_bytes: int, n_posts: int, cfg: DictConfig) -> int:
    """Refuse when the run directory's file system has less free space than ``checks.disk_headroom`` times the
    estimated shards (the raw images' bytes, an upper bound once resized) and embedding cache; returns the need."""
    need = int(float(cfg.checks.disk_headroom) * (image_bytes + n_posts * cache_bytes_per_post(cfg)))
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise UserError(f"not enough free disk space in {run_dir}: the shards and embedding cache need about "
                        f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")
    return need


def probe_writable(path: Path) -> None:
    """Create and remove a file beside ``path``: ``os.access`` says yes for root on read-only places like /proc."""
    probe = path.parent / f".{path.name}.probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) means the disk is full: ``ENOSPC``/``EDQUOT``, or torch's
    serializer failing to write (its ``RuntimeError`` names no errno)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, RuntimeError) and any(m in str(err) for m in TORCH_WRITE_FAILURES):
            return True
        err = err.__cause__ or err.__context__
    return False
