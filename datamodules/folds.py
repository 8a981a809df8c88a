"""The one K-fold assignment shared by the neural modules and every stacking member, and the held-back slice.

Folds are assigned to labelled posts only, so that neural out-of-fold predictions and tree out-of-fold predictions
line up row for row. Unlabelled posts get ``NO_FOLD`` (-1).

Strategies (``folds.strategy``):

* ``random``: labelled posts shuffled with the seed, dealt round-robin (fold sizes differ by at most one).
* ``time`` (the configs' default): labelled posts sorted by ``postdate`` and cut into K contiguous chronological
  blocks (the shape of SMPD's own train/test split: a fold's validation posts are one stretch of time). Blocks rather
  than forward chaining, so every labelled post keeps exactly one out-of-fold prediction for the blend; the
  forward-only score is the held-back slice's.
* ``user``: whole users dealt to folds (largest user first, to the emptiest fold; users of equal size in seeded
  random order), so no user has posts in two folds.

The held-back slice (``folds.holdout_fraction``, 0 = off) is the last ``fraction`` of the labelled posts by
``postdate``. Those posts get ``fold = NO_FOLD`` and ``holdout = True``: every stage treats them exactly like
unlabelled posts (never fitted on, never used for early stopping, checkpoint choice or blend weights; they get
fold-mean predictions), and only the report scores them with their labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from popstack.datamodules.atomic import atomic_path
from popstack.datamodules.schema import KEY, LABEL, NO_FOLD

STRATEGIES = ("random", "time", "user")
HOLDOUT = "holdout"


def holdout_mask(labels: np.ndarray, postdate: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean (n,): the last ``fraction`` of the labelled rows by ``postdate`` (epoch seconds; ties: later row
    first out of the slice, i.e. a stable sort). ``fraction`` in [0, 1); 0 gives an all-False mask."""
    if not 0 <= fraction < 1:
        raise ValueError(f"folds.holdout_fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels, dtype=np.float64)
    labelled = np.flatnonzero(~np.isnan(labels))
    mask = np.zeros(len(labels), dtype=bool)
    n_out = int(round(fraction * len(labelled)))
    if n_out:
        order = labelled[np.argsort(np.asarray(postdate)[labelled], kind="stable")]
        mask[order[len(order) - n_out:]] = True
    return mask


def _user_folds(uids: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold per row such that each user lies in one fold; greedy largest-first onto the emptiest fold."""
    users, inverse, counts = np.unique(uids.astype(str), return_inverse=True, return_counts=True)
    if len(users) < n_folds:
        raise ValueError(f"{len(users)} users cannot be split into {n_folds} user-disjoint folds")
    shuffled = np.random.default_rng(seed).permutation(len(users))
    order = shuffled[np.argsort(-counts[shuffled], kind="stable")]
    sizes = np.zeros(n_folds, dtype=np.int64)
    user_fold = np.empty(len(users), dtype=np.int64)
    for u in order:
        k = int(np.argmin(sizes))
        user_fold[u] = k
        sizes[k] += counts[u]
    return user_fold[inverse]


def assign_folds(labels: np.ndarray, n_folds: int, seed: int, strategy: str = "random",
                 postdate: np.ndarray | None = None, uid: np.ndarray | None = None,
                 exclude: np.ndarray | None = None) -> np.ndarray:
    """Fold id per row.

    Args:
        labels: shape (n,), float; NaN marks an unlabelled row.
        n_folds: K >= 2; ``n_folds == 1`` is rejected (use a hold-out split explicitly instead).
        seed: shuffling seed; same inputs -> same folds.
        strategy: ``random`` | ``time`` (needs ``postdate``) | ``user`` (needs ``uid``).
        exclude: optional bool (n,) of labelled rows kept out of every fold (the held-back slice).

    Returns:
        int64 array (n,): 0..K-1 for labelled, non-excluded rows, ``NO_FOLD`` otherwise.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if strategy not in STRATEGIES:
        raise ValueError(f"folds.strategy must be one of {STRATEGIES}, got {strategy!r}")
    labels = np.asarray(labels, dtype=np.float64)
    eligible = ~np.isnan(labels)
    if exclude is not None:
        eligible &= ~np.asarray(exclude, dtype=bool)
    rows = np.flatnonzero(eligible)
    if len(rows) < n_folds:
        raise ValueError(f"{len(rows)} labelled rows cannot be split into {n_folds} folds")
    folds = np.full(len(labels), NO_FOLD, dtype=np.int64)
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(len(rows))
        folds[rows[order]] = np.arange(len(rows)) % n_folds
    elif strategy == "time":
        if postdate is None:
            raise ValueError("folds.strategy=time needs the posts' postdate")
        chrono = rows[np.argsort(np.asarray(postdate)[rows], kind="stable")]
        for k, block in enumerate(np.array_split(chrono, n_folds)):
            folds[block] = k
    else:
        if uid is None:
            raise ValueError("folds.strategy=user needs the posts' uid")
        folds[rows] = _user_folds(np.asarray(uid)[rows], n_folds, seed)
    return folds


def fold_table(posts: pd.DataFrame, n_folds: int, seed: int, strategy: str = "random",
               holdout_fraction: float = 0.0) -> pd.DataFrame:
    """``post_id, fold, holdout`` for every post of ``posts`` (same row order); see the module docstring."""
    labels = posts[LABEL].to_numpy()
    postdate = posts["postdate"].to_numpy() if "postdate" in posts else None
    if holdout_fraction and postdate is None:
        raise ValueError("folds.holdout_fraction > 0 needs the posts' postdate")
    held = holdout_mask(labels, postdate, holdout_fraction) if holdout_fraction else np.zeros(len(posts), bool)
    folds = assign_folds(labels, n_folds, seed, strategy, postdate=postdate,
                         uid=posts["uid"].to_numpy() if "uid" in posts else None, exclude=held)
    return pd.DataFrame({KEY: posts[KEY].to_numpy(), "fold": folds, HOLDOUT: held})


def write_folds(folds: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        folds.to_parquet(tmp, index=False)


def read_folds(path: str | Path) -> pd.DataFrame:
    """``post_id, fold, holdout``; a table written before the held-back slice existed reads with no slice."""
    folds = pd.read_parquet(path)
    if HOLDOUT not in folds:
        folds[HOLDOUT] = False
    return folds


def train_valid_masks(folds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (training part, validation part) of fold ``k``; unlabelled rows are in neither."""
    folds = np.asarray(folds)
    valid = folds == k
    train = (folds != k) & (folds != NO_FOLD)
    return train, valid
