"""User family: profile fields, activity, habits, the provided description vectors, user x tag SVD.

Per-user aggregates (post count, habits) are computed over every post of the training run (train + test: no
labels involved) and stored in the state; new posts of known users reuse the stored values, new users get
values computed from the new posts themselves.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from popstack.features.config import FeatureConfig
from popstack.features.families import USER, column_name
from popstack.features.reduce import fit_or_apply_svd, vector_block
from popstack.features.state import FeatureState

DAY = 86400.0


def _tags(posts: pd.DataFrame) -> list[list[str]]:
    return [t.split() for t in posts["alltags"].fillna("")]


def _user_aggregates(posts: pd.DataFrame) -> pd.DataFrame:
    tags = _tags(posts)
    frame = pd.DataFrame({
        "uid": posts["uid"].to_numpy(),
        "n_tags": [len(t) for t in tags],
        "title_len": posts["title"].fillna("").str.len().to_numpy(),
        "has_geo": posts["latitude"].notna().to_numpy(),
        "has_alias": posts["pathalias"].notna().to_numpy(),
    })
    agg = frame.groupby("uid").agg(
        post_count=("n_tags", "size"), mean_tags=("n_tags", "mean"), mean_title_len=("title_len", "mean"),
        geo_share=("has_geo", "mean"), alias_present=("has_alias", "max"),
    )
    return agg.astype(np.float64)


def user_features(posts: pd.DataFrame, state: FeatureState, cfg: FeatureConfig) -> pd.DataFrame:
    key = f"{USER}.aggregates"
    local = _user_aggregates(posts)
    if not state.fitted:
        state.meta[key] = {c: local[c].to_dict() for c in local.columns}
        state.meta[f"{USER}.uids"] = sorted(local.index)
    stored = pd.DataFrame(state.meta[key])
    agg = local.copy()
    known = agg.index.intersection(stored.index)
    agg.loc[known] = stored.loc[known, agg.columns]
    per_post = agg.loc[posts["uid"].to_numpy()]

    uid_code = {u: i for i, u in enumerate(state.meta[f"{USER}.uids"])}
    postdate = posts["postdate"].to_numpy(dtype=np.float64)
    first_taken = posts["photo_firstdatetaken"].to_numpy()
    cols: dict[str, np.ndarray] = {
        "uid_code": np.array([uid_code.get(u, len(uid_code)) for u in posts["uid"]], dtype=np.float64),
        "photo_count": posts["photo_count"].to_numpy(),
        "ispro": posts["ispro"].to_numpy(),
        "canbuypro": posts["canbuypro"].to_numpy(),
        "account_age_days": (postdate - posts["photo_firstdate"].to_numpy()) / DAY,
        "first_taken_days": (postdate - first_taken) / DAY,
        "first_taken_week": np.floor(((postdate - first_taken) / DAY) / 7),
        "ispublic": posts["ispublic"].to_numpy(),
        **{c: per_post[c].to_numpy() for c in agg.columns},
    }
    out = pd.DataFrame({column_name(USER, k): np.asarray(v, dtype=np.float32) for k, v in cols.items()})
    blocks = [out]
    vec = vector_block(posts, "user_vector", "user_vec", cfg.user_vector_dim, state, cfg.seed, USER)
    if vec is not None:
        blocks.append(vec)
    if cfg.user_tag_svd_dim > 0:
        blocks.append(_user_tag_svd(posts, state, cfg))
    return pd.concat(blocks, axis=1)


def _user_tag_svd(posts: pd.DataFrame, state: FeatureState, cfg: FeatureConfig) -> pd.DataFrame:
    """Rows: users; columns: tags; values: counts. The user's SVD embedding is given to each of their posts."""
    key = f"{USER}.tag_svd"
    if not state.fitted:
        vocab = sorted({t for ts in _tags(posts) for t in ts})
        state.meta[f"{key}.vocab"] = vocab
    tag_index = {t: j for j, t in enumerate(state.meta[f"{key}.vocab"])}
    users = pd.Index(sorted(posts["uid"].unique()))
    rows, cols = [], []
    for u, ts in zip(users.get_indexer(posts["uid"]), _tags(posts)):
        for t in ts:
            j = tag_index.get(t)
            if j is not None:
                rows.append(u)
                cols.append(j)
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(users), max(1, len(tag_index))))
    m.sum_duplicates()
    m.data = np.log1p(m.data)
    emb = fit_or_apply_svd(m, cfg.user_tag_svd_dim, state, key, cfg.seed)
    if f"{key}.user_emb" not in state.arrays:
        state.arrays[f"{key}.user_emb"] = emb
        state.meta[f"{key}.users"] = list(users)
    else:  # users seen in the training run keep the embedding of all their training-run posts
        stored = pd.Index(state.meta[f"{key}.users"])
        pos = stored.get_indexer(users)
        emb[pos >= 0] = state.arrays[f"{key}.user_emb"][pos[pos >= 0]]
    per_post = emb[users.get_indexer(posts["uid"])]
    return pd.DataFrame(per_post, columns=[column_name(USER, f"tag_svd_{j:02d}") for j in range(emb.shape[1])])
