"""Target family: label statistics per user (and per any other key field asked for), strictly out-of-fold.

For a labelled post in fold k the statistics come from the labelled posts of the other folds. A post without a fold
(test, new posts, and the held-back slice, whose labels exist but must not be used) gets the same kind of number:
the mean over the K per-fold statistics, each computed from K-1 folds' labels exactly as for a training post. (All
K folds' labels at once would make its counts K/(K-1) times larger and its means shrink less than any training
row's: a column the trees and the standardiser never saw in that range.) Means are smoothed towards the global
mean (of the same K-1 folds) with ``prior`` pseudo-posts: (sum + prior * global_mean) / (count + prior).

Keys (``features.target_keys``): ``uid`` gives ``user_mean``, ``user_median``, ``user_label_count``; another post field
(``concept``, ``subcategory``, ``category``) gives ``<field>_mean``, ``<field>_median``, ``<field>_label_count``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from popstack.datamodules.schema import NO_FOLD
from popstack.features.families import TARGET, column_name
from popstack.features.state import FeatureState

#: Post fields the family can key on, and the prefix of their columns.
TARGET_KEYS = {"uid": "user", "concept": "concept", "subcategory": "subcategory", "category": "category"}


def _stats(keys: np.ndarray, labels: np.ndarray, query: np.ndarray, prior: float) -> dict[str, np.ndarray]:
    """Smoothed mean, median and count of ``labels`` per key, looked up for each of ``query``'s keys."""
    frame = pd.DataFrame({"key": keys, "y": labels})
    g = frame.groupby("key")["y"].agg(["sum", "count", "median"])
    glob = float(labels.mean())
    joined = g.reindex(query)
    count = joined["count"].fillna(0).to_numpy()
    mean = (joined["sum"].fillna(0).to_numpy() + prior * glob) / (count + prior)
    return {"mean": mean, "median": joined["median"].fillna(glob).to_numpy(), "label_count": count}


def _stats_over_folds(keys: np.ndarray, labels: np.ndarray, folds: np.ndarray | None, query: np.ndarray,
                      prior: float) -> dict[str, np.ndarray]:
    """``_stats`` for posts without a fold: the mean over folds k of the statistics from every fold but k (the
    number a training post of fold k gets). ``folds`` None (a state saved before the folds were kept): all labels."""
    ids = np.unique(folds) if folds is not None else []
    if len(ids) < 2:
        return _stats(keys, labels, query, prior)
    per_fold = [_stats(keys[folds != k], labels[folds != k], query, prior) for k in ids]
    return {name: np.mean([p[name] for p in per_fold], axis=0) for name in per_fold[0]}


def _key_features(posts: pd.DataFrame, folds: np.ndarray | None, state: FeatureState, prior: float,
                  field: str) -> dict[str, np.ndarray]:
    """The three statistics of key ``field`` for every post (out of fold for posts with a fold)."""
    keys = posts[field].astype(str).to_numpy(dtype=object)
    n = len(posts)
    out = {k: np.full(n, np.nan) for k in ("mean", "median", "label_count")}
    key_state = f"{TARGET}.uids" if field == "uid" else f"{TARGET}.keys.{field}"
    if not state.fitted:
        labels = posts["label"].to_numpy(dtype=np.float64)
        labelled = folds != NO_FOLD  # the fold decides, not the label: held-back posts have labels but no fold
        state.meta[key_state] = keys[labelled].tolist()
        state.arrays[f"{TARGET}.labels"] = labels[labelled]
        state.arrays[f"{TARGET}.folds"] = folds[labelled].astype(np.int64)
        for k in np.unique(folds[folds != NO_FOLD]):
            rows = folds == k
            src = labelled & (folds != k)
            for name, v in _stats(keys[src], labels[src], keys[rows], prior).items():
                out[name][rows] = v
        rest = folds == NO_FOLD
    else:
        rest = np.ones(n, bool)
    fitted_keys = np.asarray(state.meta[key_state], dtype=object)
    fitted_folds = state.arrays.get(f"{TARGET}.folds")
    for name, v in _stats_over_folds(fitted_keys, state.arrays[f"{TARGET}.labels"], fitted_folds, keys[rest],
                                     prior).items():
        out[name][rest] = v
    return out


def target_features(posts: pd.DataFrame, folds: np.ndarray | None, state: FeatureState, prior: float,
                    keys: tuple[str, ...] = ("uid",)) -> pd.DataFrame:
    """(n posts, 3 per key) float32: label statistics per value of each key field (see the module docstring)."""
    unknown = [k for k in keys if k not in TARGET_KEYS]
    if unknown:
        raise ValueError(f"features.target_keys: unknown field(s) {unknown}; known: {list(TARGET_KEYS)}")
    columns = {}
    for field in keys:
        for name, v in _key_features(posts, folds, state, prior, field).items():
            columns[column_name(TARGET, f"{TARGET_KEYS[field]}_{name}")] = v.astype(np.float32)
    return pd.DataFrame(columns, index=range(len(posts)))
