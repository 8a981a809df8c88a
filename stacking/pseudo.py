"""Pseudo-label selection (HyperFusion §3.5, eq. 10): confident unlabelled posts join the training parts.

Confidence of an unlabelled post = 1 / (std of the member predictions + eps): members that agree are
confident. The paper defines neither the confidence nor alpha: both are ours (docs/reproduction.md).
Posts with confidence > tau = mu + alpha * sigma (mean and std of the confidences) are selected and
labelled by the caller (``stacking.stack.fold_pseudo_labels``: the mean of the fold's own members).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def confidence(member_preds: np.ndarray) -> np.ndarray:
    """(n, m) member predictions -> (n,) confidence."""
    return 1.0 / (np.std(member_preds, axis=1) + EPS)


def select_pseudo(member_preds: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Boolean mask of selected posts and the threshold tau."""
    conf = confidence(member_preds)
    tau = float(conf.mean() + alpha * conf.std())
    return conf > tau, tau
