"""Cross-modal family: cosine similarity of CLIP image and text embeddings (HyperFusion eq. 5)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from popstack.features.families import CROSSMODAL, column_name


def crossmodal_features(image_emb: np.ndarray, text_emb: np.ndarray,
                        has_image: np.ndarray | None = None) -> pd.DataFrame:
    """(n, D) image and text embeddings -> one column of cosines; NaN where the post has no image."""
    a = image_emb / np.maximum(np.linalg.norm(image_emb, axis=1, keepdims=True), 1e-12)
    b = text_emb / np.maximum(np.linalg.norm(text_emb, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(1).astype(np.float32)
    if has_image is not None:
        cos[~np.asarray(has_image, bool)] = np.nan
    return pd.DataFrame({column_name(CROSSMODAL, "clip_cos"): cos})
