"""The neural modules' prediction columns as stack members (not registered: the stack makes one per column)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from popstack.stacking.members.base import label_bounds


class NeuralMember:
    """A neural model's predictions (out-of-fold for training rows, fold mean for the rest) read from a column,
    kept inside the training label range widened by ``margin`` of its width (``stacking.guard.label_margin``): a
    regressor that extrapolates (a prediction of 210 for labels near 10) cannot drag the blend with it.
    ``margin`` None: no clipping (a member saved before the guard existed)."""

    extension = "json"

    def __init__(self, column: str, margin: float | None):
        self.column = column
        self.name = column
        self.margin = margin
        self.bounds: tuple[float, float] | None = None

    def fit(self, X_tr, y_tr, X_va, y_va):
        if self.column not in X_tr.columns:
            raise KeyError(f"neural member: column {self.column!r} not in the stack inputs")
        if self.margin is not None and len(y_tr):
            self.bounds = label_bounds(np.asarray(y_tr, dtype=np.float64), self.margin)
        return self

    def predict(self, X):
        raw = X[self.column].to_numpy(dtype=np.float64)
        return raw if self.bounds is None else np.clip(raw, *self.bounds)

    def save(self, path):
        Path(path).write_text(json.dumps({"column": self.column, "bounds": self.bounds}))

    @classmethod
    def load(cls, path):
        meta = json.loads(Path(path).read_text())
        member = cls(meta["column"], None)
        member.bounds = tuple(meta["bounds"]) if meta["bounds"] else None
        return member

    def feature_importance(self):
        return None
