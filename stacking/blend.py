"""Blending member predictions with non-negative weights that sum to 1 (HyperFusion eq. 8), fitted per fold.

Methods (``fit_weights(P, y, method)``, P: (n, m) member predictions of a fold's validation part):

* ``caruana``: greedy forward selection with replacement (Caruana et al. 2004, as in AutoGluon), ``size``
  steps, each adding the member that most lowers the MAE of the running average; weights = counts / size.
* ``mae``: SLSQP on the simplex minimising MAE, started from Caruana's weights.
* ``spearman``: SLSQP on the simplex maximising a differentiable proxy of Spearman: the Pearson correlation of
  the blend with the ranks of y (the blend's own ranks are not differentiable).
* ``ridge``: a level-2 model instead of weights -- non-negative least squares with an intercept, weights not
  normalised; ``blend`` then applies intercept + P @ w.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, nnls
from scipy.stats import rankdata

METHODS = ("caruana", "mae", "spearman", "ridge")


def caruana_weights(P: np.ndarray, y: np.ndarray, size: int = 25) -> np.ndarray:
    m = P.shape[1]
    counts = np.zeros(m)
    running = np.zeros(len(y))
    for step in range(1, size + 1):
        errors = [np.mean(np.abs((running * (step - 1) + P[:, j]) / step - y)) for j in range(m)]
        best = int(np.argmin(errors))  # ties go to the lowest index: deterministic
        counts[best] += 1
        running = (running * (step - 1) + P[:, best]) / step
    return counts / counts.sum()


def _simplex_opt(P: np.ndarray, objective, start: np.ndarray) -> np.ndarray:
    m = P.shape[1]
    res = minimize(objective, start, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}], options={"maxiter": 200})
    w = np.clip(res.x if res.success else start, 0, None)
    return w / w.sum()


def fit_weights(P: np.ndarray, y: np.ndarray, method: str = "caruana", size: int = 25) -> dict:
    """Blend parameters ``{"weights": (m,), "intercept": float}`` for one fold."""
    if method not in METHODS:
        raise ValueError(f"blend method must be one of {METHODS}, got {method!r}")
    P, y = np.asarray(P, float), np.asarray(y, float)
    start = caruana_weights(P, y, size)
    if method == "caruana" or P.shape[1] == 1:
        return {"weights": start, "intercept": 0.0}
    if method == "mae":
        w = _simplex_opt(P, lambda w: np.mean(np.abs(P @ w - y)), start)
        if np.mean(np.abs(P @ w - y)) > np.mean(np.abs(P @ start - y)):
            w = start  # SLSQP on a non-smooth objective can stall: never return worse than the start
        return {"weights": w, "intercept": 0.0}
    if method == "spearman":
        ry = (rankdata(y) - (len(y) + 1) / 2)
        ry /= np.linalg.norm(ry)

        def neg_corr(w):
            b = P @ w
            b = b - b.mean()
            return -float(b @ ry / (np.linalg.norm(b) + 1e-12))

        return {"weights": _simplex_opt(P, neg_corr, start), "intercept": 0.0}
    X = np.column_stack([P, np.ones(len(y))])
    coef, _ = nnls(X[:, :-1], y - y.mean())
    intercept = float(y.mean() - (P @ coef).mean())
    return {"weights": coef, "intercept": intercept}


def blend(P: np.ndarray, params: dict) -> np.ndarray:
    return np.asarray(P, float) @ np.asarray(params["weights"], float) + float(params["intercept"])
