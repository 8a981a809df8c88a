"""The two SMP Challenge metrics, one implementation used everywhere."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def src(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Spearman rank correlation (the official scorer uses scipy.stats.spearmanr); 0 for constant inputs."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    if len(y_true) < 2 or np.std(y_pred) == 0 or np.std(y_true) == 0:
        return 0.0
    return float(spearmanr(y_true, y_pred).statistic)


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y_true, float) - np.asarray(y_pred, float))))


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {"src": src(y_true, y_pred), "mae": mae(y_true, y_pred)}
