"""Assemble the tabular feature matrix: every family, float32, keyed by post_id, plus its schema.

    fs = build_features(posts, folds, FeatureConfig(), image_dir=run_dir / "shards")   # fits the state
    fs.save(run_dir / "features")
    new = transform_features(new_posts, FeatureState.load(run_dir / "features" / "state"), cfg, image_dir=...)

``schema.json`` maps every column to its family and lists the categorical columns, so importance plots and
the ablations (``features.families.ABLATION_GROUPS``) select families by name.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from popstack.datamodules.schema import KEY, NO_FOLD, any_image_readable
from popstack.features.category import categorical_columns, category_features
from popstack.features.config import FeatureConfig
from popstack.features.extra import extra_categorical_columns, extra_features, fitted_columns
from popstack.features.families import USER, column_name, family_of
from popstack.features.glove import glove_features
from popstack.features.image_stats import image_stats_features, shard_image_statistics
from popstack.features.sentence import SentenceEncoder, resolve_model_dir, sentence_features
from popstack.features.spatial import spatial_features
from popstack.features.state import FeatureState
from popstack.features.target import target_features
from popstack.features.temporal import temporal_features
from popstack.features.text import text_features
from popstack.features.user import user_features

log = logging.getLogger("popstack")


@dataclass
class FeatureSet:
    """``frame``: float32 features with a ``post_id`` column; ``families``: column -> family."""

    frame: pd.DataFrame
    families: dict[str, str]
    categorical: list[str]
    state: FeatureState
    config: FeatureConfig
    seconds: dict[str, float] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.frame.to_parquet(directory / "features.parquet", index=False)
        schema = {"families": self.families, "categorical": self.categorical, "config": asdict(self.config)}
        (directory / "schema.json").write_text(json.dumps(schema, indent=1))
        self.state.save(directory / "state")


def read_schema(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "schema.json").read_text())


def _families(posts, folds, state, cfg, encoder, image_dir, progress: bool = False
              ) -> tuple[list[pd.DataFrame], dict[str, float]]:
    from popstack.datamodules.progress import progress as progress_bar

    seconds: dict[str, float] = {}
    blocks: list[pd.DataFrame] = []
    bar = progress_bar(desc="features", unit="family", enabled=progress)

    def timed(name, fn):
        bar.set_postfix_str(name)
        start = time.perf_counter()
        blocks.append(fn())
        seconds[name] = round(time.perf_counter() - start, 3)
        bar.update()

    timed("user", lambda: user_features(posts, state, cfg))
    timed("temporal", lambda: temporal_features(posts, state))
    timed("spatial", lambda: spatial_features(posts, state, cfg))
    timed("category", lambda: category_features(posts, state))
    timed("text", lambda: text_features(posts, state, cfg))
    if cfg.sentence_model:
        timed("sentence", lambda: sentence_features(posts, state, cfg, encoder))
    if cfg.glove_path:
        timed("glove", lambda: glove_features(posts, cfg.glove_path))
    readable = images_readable(posts, state)
    if cfg.image_stats and readable:
        timed("image_stats", lambda: image_stats_features(
            posts, shard_image_statistics(image_dir) if image_dir else None))
    timed("target", lambda: target_features(posts, folds, state, cfg.target_prior, tuple(cfg.target_keys)))
    if fitted_columns(posts, state):
        timed("extra", lambda: extra_features(posts, state))
    bar.close()
    return blocks, seconds


IMAGES_SKIPPED = "image_stats.skipped"


def images_readable(posts: pd.DataFrame, state: FeatureState) -> bool:
    """Whether image features are worth computing: when fitting, some post has a readable image
    (``datamodules.schema.any_image_readable``; else one log line and the image family is skipped, now and for new
    posts); for new posts, what the fit decided (recorded in the state whatever ``image_stats`` says, so
    ``pipeline.inference.Predictor`` follows the run's decision for the neural modules too)."""
    if state.fitted:
        return not state.meta.get(IMAGES_SKIPPED, False)
    readable = any_image_readable(posts)
    if not readable:
        log.info("features: no post has a readable image; the image-statistics family is skipped")
    state.meta[IMAGES_SKIPPED] = not readable
    return readable


def _assemble(posts: pd.DataFrame, blocks: list[pd.DataFrame]) -> pd.DataFrame:
    frame = pd.concat([b.reset_index(drop=True) for b in blocks], axis=1).astype(np.float32)
    frame.insert(0, KEY, posts[KEY].to_numpy())
    return frame


def constant_columns(frame: pd.DataFrame, rows: np.ndarray) -> list[str]:
    """Feature columns of ``frame`` holding one value (NaN counts as a value) on ``rows`` (bool mask)."""
    part = frame.loc[rows, [c for c in frame.columns if c != KEY]]
    return [c for c in part.columns if part[c].nunique(dropna=False) <= 1]


def _drop_constant(frame: pd.DataFrame, training: np.ndarray) -> pd.DataFrame:
    """``frame`` without the columns constant on the training rows (the rows with a fold): nothing learns from them
    and a test row that differs is off every scale fitted on them (a z-score over a zero spread). One log line."""
    if not training.any():
        return frame
    dropped = constant_columns(frame, training)
    if dropped:
        log.info("features: %d column(s) constant in training dropped: %s", len(dropped), ", ".join(dropped))
    return frame.drop(columns=dropped)


def build_features(posts: pd.DataFrame, folds: np.ndarray, cfg: FeatureConfig,
                   encoder: SentenceEncoder | None = None, image_dir: str | Path | None = None,
                   progress: bool = False) -> FeatureSet:
    """Fit every family on the training run's posts (train + test rows) and return the matrix, without the columns
    that are constant on the training rows (``folds != NO_FOLD``; one log line names them).

    ``image_dir``: the WebDataset shard directory holding the posts' images (image-statistics family); None
    leaves that family NaN. ``progress``: progress over the families and per batch of the sentence encoder
    (``datamodules.progress``: a bar on a terminal, periodic log lines otherwise)."""
    state = FeatureState()
    if cfg.sentence_model and encoder is None:
        encoder = SentenceEncoder(resolve_model_dir(cfg.sentence_model), cfg.sentence_max_length,
                                  cfg.sentence_batch_size)
    if encoder is not None:
        encoder.progress = progress  # per batch inside the family (the longest one at SMPD scale)
    blocks, seconds = _families(posts.reset_index(drop=True), np.asarray(folds), state, cfg, encoder, image_dir,
                                progress)
    state.fitted = True
    frame = _drop_constant(_assemble(posts, blocks), np.asarray(folds) != NO_FOLD)
    families = {c: family_of(c) for c in frame.columns if c != KEY}
    state.meta["columns"] = list(families)
    cats = categorical_columns() + [column_name(USER, "uid_code")] + extra_categorical_columns(posts, state)
    return FeatureSet(frame, families, [c for c in cats if c in families], state, cfg, seconds)


def transform_features(posts: pd.DataFrame, state: FeatureState, cfg: FeatureConfig,
                       encoder: SentenceEncoder | None = None, image_dir: str | Path | None = None) -> pd.DataFrame:
    """Features of new posts with the fitted ``state``; same columns, in the same order, as the training run."""
    if not state.fitted:
        raise ValueError("transform_features needs a fitted FeatureState (FeatureState.load(<run>/features/state))")
    blocks, _ = _families(posts.reset_index(drop=True), None, state, cfg, encoder, image_dir)
    frame = _assemble(posts, blocks)
    columns = state.meta["columns"]
    for c in columns:  # e.g. a vector family absent from the new posts
        if c not in frame.columns:
            frame[c] = np.float32(np.nan)
    return frame[[KEY, *columns]]
