"""Target family: per-user label statistics, strictly out-of-fold.

For a labelled post in fold k the statistics come from the labelled posts of the other folds; for posts without a
fold (test, new posts, and the held-back slice, whose labels exist but must not be used) from every post that has
a fold. Means are smoothed towards the global mean with ``prior``
pseudo-posts: (sum + prior * global_mean) / (count + prior).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from datamodules.schema import NO_FOLD
from features.families import TARGET, column_name
from features.state import FeatureState


def _stats(uids: np.ndarray, labels: np.ndarray, query: np.ndarray, prior: float) -> dict[str, np.ndarray]:
    frame = pd.DataFrame({"uid": uids, "y": labels})
    g = frame.groupby("uid")["y"].agg(["sum", "count", "median"])
    glob = float(labels.mean())
    joined = g.reindex(query)
    count = joined["count"].fillna(0).to_numpy()
    mean = (joined["sum"].fillna(0).to_numpy() + prior * glob) / (count + prior)
    return {"user_mean": mean, "user_median": joined["median"].fillna(glob).to_numpy(), "user_label_count": count}


def target_features(posts: pd.DataFrame, folds: np.ndarray | None, state: FeatureState, prior: float) -> pd.DataFrame:
    uids = posts["uid"].to_numpy()
    n = len(posts)
    out = {k: np.full(n, np.nan) for k in ("user_mean", "user_median", "user_label_count")}
    if not state.fitted:
        labels = posts["label"].to_numpy(dtype=np.float64)
        labelled = folds != NO_FOLD  # the fold decides, not the label: held-back posts have labels but no fold
        state.meta[f"{TARGET}.uids"] = uids[labelled].tolist()
        state.arrays[f"{TARGET}.labels"] = labels[labelled]
        for k in np.unique(folds[folds != NO_FOLD]):
            rows = folds == k
            src = labelled & (folds != k)
            for name, v in _stats(uids[src], labels[src], uids[rows], prior).items():
                out[name][rows] = v
        rest = folds == NO_FOLD
    else:
        rest = np.ones(n, bool)
    all_uids = np.asarray(state.meta[f"{TARGET}.uids"], dtype=object)
    for name, v in _stats(all_uids, state.arrays[f"{TARGET}.labels"], uids[rest], prior).items():
        out[name][rest] = v
    return pd.DataFrame({column_name(TARGET, k): v.astype(np.float32) for k, v in out.items()})
