"""Fitted feature state: what the training run learned (vocabularies, SVD/PCA bases, per-user statistics),
saved as JSON + NPZ (no pickle) so ``predict.py`` applies exactly the same transforms to new posts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class FeatureState:
    """``meta``: JSON-serialisable values; ``arrays``: numpy arrays. Keys are ``<family>.<name>``."""

    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    fitted: bool = False

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "state.json").write_text(json.dumps(self.meta))
        np.savez(directory / "arrays.npz", **self.arrays)

    @classmethod
    def load(cls, directory: str | Path) -> "FeatureState":
        directory = Path(directory)
        meta = json.loads((directory / "state.json").read_text())
        with np.load(directory / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(meta=meta, arrays=arrays, fitted=True)
