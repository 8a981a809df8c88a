"""The one K-fold assignment shared by the neural modules and every stacking member.

Folds are assigned to labelled posts only, shuffled with a seed, so that neural out-of-fold predictions
and tree out-of-fold predictions line up row for row. Unlabelled posts get ``NO_FOLD`` (-1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.schema import KEY, LABEL, NO_FOLD


def assign_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id per row.

    Args:
        labels: shape (n,), float; NaN marks an unlabelled row.
        n_folds: K >= 2; ``n_folds == 1`` is rejected (use a hold-out split explicitly instead).
        seed: shuffling seed; same seed and same labels -> same folds.

    Returns:
        int64 array (n,): 0..K-1 for labelled rows (fold sizes differ by at most one), ``NO_FOLD`` otherwise.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    labels = np.asarray(labels, dtype=np.float64)
    labelled = np.flatnonzero(~np.isnan(labels))
    if len(labelled) < n_folds:
        raise ValueError(f"{len(labelled)} labelled rows cannot be split into {n_folds} folds")
    folds = np.full(len(labels), NO_FOLD, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labelled))
    folds[labelled[order]] = np.arange(len(labelled)) % n_folds
    return folds


def fold_table(posts: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """``post_id, fold`` for every post of ``posts`` (same row order)."""
    return pd.DataFrame({KEY: posts[KEY].to_numpy(), "fold": assign_folds(posts[LABEL].to_numpy(), n_folds, seed)})


def write_folds(folds: pd.DataFrame, path: str | Path) -> None:
    folds.to_parquet(path, index=False)


def read_folds(path: str | Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def train_valid_masks(folds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (training part, validation part) of fold ``k``; unlabelled rows are in neither."""
    folds = np.asarray(folds)
    valid = folds == k
    train = (folds != k) & (folds != NO_FOLD)
    return train, valid
