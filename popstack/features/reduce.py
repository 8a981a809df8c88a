"""Fitted linear reductions stored as plain arrays (mean + components), so they reload without pickle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA, TruncatedSVD

from popstack.features.families import column_name
from popstack.features.state import FeatureState


def fit_or_apply_svd(
    x: np.ndarray | sp.spmatrix, dim: int, state: FeatureState, key: str, seed: int, centre: bool = False
) -> np.ndarray:
    """Project ``x`` (n, d) onto ``dim`` components fitted on the first call (TruncatedSVD, or PCA when
    ``centre``); later calls (``state.fitted``) reuse the stored basis. Returns float32 (n, dim')."""
    if not state.fitted:
        k = max(1, min(dim, x.shape[1] - 1, x.shape[0] - 1))
        if centre:
            model = PCA(n_components=k, random_state=seed, svd_solver="randomized").fit(np.asarray(x))
            state.arrays[f"{key}.mean"] = model.mean_.astype(np.float32)
        else:
            model = TruncatedSVD(n_components=k, random_state=seed, algorithm="randomized").fit(x)
            state.arrays[f"{key}.mean"] = np.zeros(x.shape[1], dtype=np.float32)
        state.arrays[f"{key}.components"] = model.components_.astype(np.float32)
    comps = state.arrays[f"{key}.components"]
    mean = state.arrays[f"{key}.mean"]
    if sp.issparse(x):
        return np.asarray(x @ comps.T, dtype=np.float32) - (mean @ comps.T).astype(np.float32)
    return ((np.asarray(x, dtype=np.float32) - mean) @ comps.T).astype(np.float32)


def vector_block(posts: pd.DataFrame, column: str, name: str, dim: int, state: FeatureState, seed: int,
                 family: str) -> pd.DataFrame | None:
    """The provided 399/400-float vectors, raw (dim 0) or SVD-reduced; rows without a vector are NaN."""
    present = np.array([v is not None for v in posts[column]])
    key = f"{family}.{name}"
    if not state.fitted:
        state.meta[f"{key}.present"] = bool(present.any())
    if not state.meta[f"{key}.present"]:
        return None
    width = len(next(v for v in posts[column] if v is not None)) if present.any() else None
    if width is None:
        width = int(state.meta[f"{key}.width"])
    state.meta.setdefault(f"{key}.width", width)
    mat = np.zeros((len(posts), width), dtype=np.float32)
    for i, v in enumerate(posts[column]):
        if v is not None:
            mat[i] = v
    if dim > 0:
        if not state.fitted:
            fit_or_apply_svd(mat[present], dim, state, key, seed)
        mat = fit_or_apply_svd(mat, dim, state, key, seed)
    mat[~present] = np.nan
    return pd.DataFrame(mat, columns=[column_name(family, f"{name}_{j:03d}") for j in range(mat.shape[1])])
