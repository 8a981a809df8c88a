"""Stage 2, features: the tabular matrix (``features/``) and its standardised copy for the neural MLP."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from datamodules.folds import read_folds
from datamodules.schema import KEY, NO_FOLD
from datamodules.smpd import read_posts
from features.build import build_features
from features.config import FeatureConfig
from features.preprocess import Standardiser
from datamodules.atomic import atomic_path
from pipeline.manifest import StageResult

log = logging.getLogger("popstack")

TABULAR = "tabular.parquet"
TABULAR_SCALER = "tabular_standardiser.npz"


def feature_config(cfg: DictConfig) -> FeatureConfig:
    return FeatureConfig(**OmegaConf.to_container(cfg.features, resolve=True), seed=int(cfg.seed))


def featurize(cfg: DictConfig, run_dir: Path) -> StageResult:
    """The features stage; ``features/`` is written under a temporary name and replaces the old one when complete."""
    if not cfg.features.glove_path:
        log.info("features: GloVe off (features.glove_path is empty; HyperFusion's 300-d tag/title vectors need a "
                 "GloVe text file, e.g. features.glove_path=/data/glove.42B.300d.txt)")
    with atomic_path(run_dir / "features") as out:
        return _featurize(cfg, run_dir, out)


def _featurize(cfg: DictConfig, run_dir: Path, out: Path) -> StageResult:
    posts = read_posts(run_dir / "posts.parquet")
    folds = read_folds(run_dir / "folds.parquet")["fold"].to_numpy()
    fs = build_features(posts, folds, feature_config(cfg), image_dir=run_dir / "shards",
                        progress=bool(cfg.progress_bar))
    fs.save(out)
    labelled = folds != NO_FOLD
    scaler = Standardiser.fit(fs.frame.loc[labelled, list(fs.families)])
    scaler.save(out / TABULAR_SCALER)
    tab = pd.DataFrame(scaler.transform(fs.frame[list(fs.families)]), columns=list(fs.families))
    tab.insert(0, KEY, fs.frame[KEY].to_numpy())
    tab.to_parquet(out / TABULAR, index=False)
    per_family = pd.Series(fs.families).value_counts().to_dict()
    log.info("features: %d columns (%s)", len(fs.families), ", ".join(f"{k}={v}" for k, v in per_family.items()))
    return StageResult(
        outputs=["features/features.parquet", "features/schema.json", "features/state", f"features/{TABULAR}"],
        counts={"columns": len(fs.families), **{f"columns_{k}": int(v) for k, v in per_family.items()}},
        metrics={f"seconds_{k}": v for k, v in fs.seconds.items()},
    )
