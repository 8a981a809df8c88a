"""GloVe family: mean word vectors of tags and of titles from a user-supplied GloVe text file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from popstack.features.families import GLOVE, column_name


def load_glove(path: str | Path, vocabulary: set[str] | None = None) -> dict[str, np.ndarray]:
    """``word v1 v2 ...`` lines -> {word: float32 vector}; only words in ``vocabulary`` when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file not found: {path}")
    vectors: dict[str, np.ndarray] = {}
    dim = None
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.rstrip().split(" ")
            if len(parts) < 2:
                continue
            word = parts[0]
            if vocabulary is not None and word not in vocabulary:
                continue
            try:
                vec = np.asarray(parts[1:], dtype=np.float32)
            except ValueError as err:
                raise ValueError(f"{path}: line {lineno}: non-numeric vector for {word!r}") from err
            if dim is None:
                dim = len(vec)
            elif len(vec) != dim:
                raise ValueError(f"{path}: line {lineno}: {len(vec)} values, expected {dim}")
            vectors[word] = vec
    if dim is None:
        raise ValueError(f"{path}: no vectors read")
    return vectors


def mean_vectors(texts: pd.Series, vectors: dict[str, np.ndarray], dim: int) -> np.ndarray:
    """(n, dim) mean of the known (lower-cased) words of each text; NaN rows when no word is known."""
    out = np.full((len(texts), dim), np.nan, dtype=np.float32)
    for i, text in enumerate(texts.fillna("")):
        hits = [vectors[w] for w in text.lower().split() if w in vectors]
        if hits:
            out[i] = np.mean(hits, axis=0)
    return out


def glove_features(posts: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    words = {w for col in ("alltags", "title") for t in posts[col].fillna("") for w in t.lower().split()}
    vectors = load_glove(path, words)
    dim = len(next(iter(vectors.values()))) if vectors else 0
    blocks = {}
    for col, name in (("alltags", "tags"), ("title", "title")):
        mat = mean_vectors(posts[col], vectors, dim)
        for j in range(dim):
            blocks[column_name(GLOVE, f"{name}_{j:03d}")] = mat[:, j]
    return pd.DataFrame(blocks)
