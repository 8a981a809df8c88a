"""Target family: label statistics per user (and per any other key field asked for), strictly out-of-fold.

For a labelled post in fold k the statistics come from the labelled posts of the other folds; for posts without a
fold (test, new posts, and the held-back slice, whose labels exist but must not be used) from every post that has
a fold. Means are smoothed towards the global mean with ``prior``
pseudo-posts: (sum + prior * global_mean) / (count + prior).

Keys (``features.target_keys``): ``uid`` gives ``user_mean``, ``user_median``, ``user_label_count``; another post field
(``concept``, ``subcategory``, ``category``) gives ``<field>_mean``, ``<field>_median``, ``<field>_label_count``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from datamodules.schema import NO_FOLD
from features.families import TARGET, column_name
from features.state import FeatureState

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
        for k in np.unique(folds[folds != NO_FOLD]):
            rows = folds == k
            src = labelled & (folds != k)
            for name, v in _stats(keys[src], labels[src], keys[rows], prior).items():
                out[name][rows] = v
        rest = folds == NO_FOLD
    else:
        rest = np.ones(n, bool)
    fitted_keys = np.asarray(state.meta[key_state], dtype=object)
    for name, v in _stats(fitted_keys, state.arrays[f"{TARGET}.labels"], keys[rest], prior).items():
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
