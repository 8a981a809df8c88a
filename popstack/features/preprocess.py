"""Preprocessing shared by members that need it: imputation, standardisation, IQR filtering.

``Standardiser`` imputes NaN with the training median (an all-NaN column gets 0), then scales to zero mean and
unit variance with training statistics, and (``clip``) keeps each z-score within [-clip, clip], so a post far outside
the training range (a count that grew, a new extreme) cannot push a neural input to z = 1000; it saves to / loads
from ``.npz`` (no pickle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class Standardiser:
    """Median imputation + z-scoring fitted on training rows, z clipped to [-clip, clip] (None: unclipped);
    (n, d) float32 in and out."""

    def __init__(self, columns: list[str], median: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 clip: float | None = None):
        self.columns, self.median, self.mean, self.std = list(columns), median, mean, std
        if clip is not None and not clip > 0:
            raise ValueError(f"standardiser clip must be > 0 or None, got {clip}")
        self.clip = None if clip is None else float(clip)

    @classmethod
    def fit(cls, frame: pd.DataFrame, clip: float | None = None) -> "Standardiser":
        x = frame.to_numpy(dtype=np.float64)
        with np.errstate(all="ignore"):
            median = np.nan_to_num(np.nanmedian(x, axis=0), nan=0.0) if len(x) else np.zeros(x.shape[1])
        filled = np.where(np.isnan(x), median, x)
        std = filled.std(axis=0)
        return cls(list(frame.columns), median, filled.mean(axis=0), np.where(std > 1e-12, std, 1.0), clip)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise KeyError(f"columns missing for the standardiser: {missing[:5]}")
        x = frame[self.columns].to_numpy(dtype=np.float64)
        x = np.where(np.isnan(x), self.median, x)
        z = (x - self.mean) / self.std
        if self.clip is not None:
            z = np.clip(z, -self.clip, self.clip)
        return z.astype(np.float32)

    def save(self, path: str | Path) -> None:
        np.savez(path, columns=np.array(self.columns), median=self.median, mean=self.mean, std=self.std,
                 clip=np.float64(np.nan if self.clip is None else self.clip))

    @classmethod
    def load(cls, path: str | Path) -> "Standardiser":
        with np.load(path, allow_pickle=False) as z:
            clip = float(z["clip"]) if "clip" in z.files else float("nan")  # saved before clipping existed: none
            return cls(z["columns"].tolist(), z["median"], z["mean"], z["std"], None if np.isnan(clip) else clip)


def iqr_keep_mask(values: np.ndarray, k: float) -> np.ndarray:
    """True for values inside [Q1 - k*IQR, Q3 + k*IQR] (NaN counts as kept: it is not an outlier)."""
    values = np.asarray(values, dtype=np.float64)
    q1, q3 = np.nanpercentile(values, [25, 75])
    lo, hi = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    return np.isnan(values) | ((values >= lo) & (values <= hi))
