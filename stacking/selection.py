"""Training-row selection: IQR label filter (HyperFusion) and loss-based sample selection (CMPA-DGPL §4.2)."""

from __future__ import annotations

import numpy as np

from popstack.features.preprocess import iqr_keep_mask


def iqr_filter(y: np.ndarray, k: float) -> np.ndarray:
    """Keep-mask of training rows whose label lies within the IQR fences (k * IQR beyond the quartiles)."""
    return iqr_keep_mask(y, k)


def loss_based_keep(losses: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the ``fraction`` of rows with the lowest first-pass loss (the paper keeps 77%)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"selection fraction must be in (0, 1], got {fraction}")
    n_keep = int(round(fraction * len(losses)))
    keep = np.zeros(len(losses), dtype=bool)
    keep[np.argsort(losses, kind="stable")[:n_keep]] = True
    return keep
