"""Preprocessing shared by members that need it: imputation, standardisation, IQR filtering.

``Standardiser`` imputes NaN with the training median (an all-NaN column gets 0), then scales to zero mean and
unit variance with training statistics; it saves to / loads from ``.npz`` (no pickle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class Standardiser:
    """Median imputation + z-scoring fitted on training rows; (n, d) float32 in and out."""

    def __init__(self, columns: list[str], median: np.ndarray, mean: np.ndarray, std: np.ndarray):
        self.columns, self.median, self.mean, self.std = list(columns), median, mean, std

    @classmethod
    def fit(cls, frame: pd.DataFrame) -> "Standardiser":
        x = frame.to_numpy(dtype=np.float64)
        with np.errstate(all="ignore"):
            median = np.nan_to_num(np.nanmedian(x, axis=0), nan=0.0) if len(x) else np.zeros(x.shape[1])
        filled = np.where(np.isnan(x), median, x)
        std = filled.std(axis=0)
        return cls(list(frame.columns), median, filled.mean(axis=0), np.where(std > 1e-12, std, 1.0))

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise KeyError(f"columns missing for the standardiser: {missing[:5]}")
        x = frame[self.columns].to_numpy(dtype=np.float64)
        x = np.where(np.isnan(x), self.median, x)
        return ((x - self.mean) / self.std).astype(np.float32)

    def save(self, path: str | Path) -> None:
        np.savez(path, columns=np.array(self.columns), median=self.median, mean=self.mean, std=self.std)

    @classmethod
    def load(cls, path: str | Path) -> "Standardiser":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["columns"].tolist(), z["median"], z["mean"], z["std"])


def iqr_keep_mask(values: np.ndarray, k: float = 1.5) -> np.ndarray:
    """True for values inside [Q1 - k*IQR, Q3 + k*IQR] (NaN counts as kept: it is not an outlier)."""
    values = np.asarray(values, dtype=np.float64)
    q1, q3 = np.nanpercentile(values, [25, 75])
    lo, hi = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    return np.isnan(values) | ((values >= lo) & (values <= hi))
