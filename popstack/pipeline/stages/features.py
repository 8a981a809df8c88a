"""Stage 2, features: the tabular matrix (``features/``) and its standardised copy for the neural MLP."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from popstack.datamodules.atomic import atomic_path
from popstack.datamodules.folds import read_folds
from popstack.datamodules.schema import KEY, NO_FOLD
from popstack.datamodules.smpd import read_posts
from popstack.features.build import build_features
from popstack.features.config import FeatureConfig
from popstack.features.preprocess import Standardiser
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import StageResult, file_digest
from popstack.pipeline.stages.base import StageContext, common_config

log = logging.getLogger("popstack")


def feature_config(cfg: DictConfig) -> FeatureConfig:
    return FeatureConfig(**OmegaConf.to_container(cfg.features, resolve=True), seed=int(cfg.seed))


def standardised(frame: pd.DataFrame, scaler: Standardiser) -> pd.DataFrame:
    """``post_id`` + the scaler's columns of ``frame``, standardised: the neural MLP's tabular input, the same for
    the training run and for new posts."""
    tab = pd.DataFrame(scaler.transform(frame[list(scaler.columns)]), columns=list(scaler.columns))
    tab.insert(0, KEY, frame[KEY].to_numpy())
    return tab


def config(c: dict) -> dict:
    return {"features": c["features"], **common_config(c)}


def outside_inputs(cfg: DictConfig) -> dict | None:
    """The GloVe file's digest when one is configured."""
    glove = cfg.features.glove_path
    return {"glove": file_digest(Path(glove))} if glove and Path(glove).is_file() else None


def run(ctx: StageContext) -> StageResult:
    """The features stage; ``features/`` is written under a temporary name and replaces the old one when complete."""
    cfg, layout = ctx.cfg, ctx.layout
    if not cfg.features.glove_path:
        log.info("features: GloVe off (features.glove_path is empty; HyperFusion's 300-d tag/title vectors need a "
                 "GloVe text file, e.g. features.glove_path=/data/glove.42B.300d.txt)")
    with atomic_path(layout.features) as tmp:  # files of features/ are written into tmp/ under the same names
        return _featurize(cfg, layout, lambda path: tmp / path.relative_to(layout.features))


def _featurize(cfg: DictConfig, layout: RunLayout, staged) -> StageResult:
    posts = read_posts(layout.posts)
    folds = read_folds(layout.folds)["fold"].to_numpy()
    fs = build_features(posts, folds, feature_config(cfg), image_dir=layout.shards, progress=bool(cfg.progress_bar))
    fs.save(staged(layout.features))
    labelled = folds != NO_FOLD
    scaler = Standardiser.fit(fs.frame.loc[labelled, list(fs.families)], clip=fs.config.standardised_clip)
    scaler.save(staged(layout.tabular_scaler))
    standardised(fs.frame, scaler).to_parquet(staged(layout.tabular), index=False)
    per_family = pd.Series(fs.families).value_counts().to_dict()
    log.info("features: %d columns (%s)", len(fs.families), ", ".join(f"{k}={v}" for k, v in per_family.items()))
    return StageResult(
        outputs=[RunLayout.feature_table, RunLayout.feature_schema, RunLayout.feature_state, RunLayout.tabular,
                 RunLayout.tabular_scaler],
        counts={"columns": len(fs.families), **{f"columns_{k}": int(v) for k, v in per_family.items()}},
        metrics={f"seconds_{k}": v for k, v in fs.seconds.items()},
    )
