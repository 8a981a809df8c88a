"""Category family: Category / Subcategory / Concept / Mediatype as integer codes of the training vocabulary.

A value unseen when the state was fitted gets its own code (the vocabulary size), never an error.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from popstack.features.families import CATEGORY, column_name
from popstack.features.state import FeatureState

CATEGORICAL_FIELDS: tuple[str, ...] = ("category", "subcategory", "concept", "mediatype")


def category_features(posts: pd.DataFrame, state: FeatureState) -> pd.DataFrame:
    out = {}
    for f in CATEGORICAL_FIELDS:
        key = f"{CATEGORY}.{f}"
        if not state.fitted:
            state.meta[key] = sorted(map(str, posts.loc[posts["split"] == "train", f].unique()))
        vocab = {v: i for i, v in enumerate(state.meta[key])}
        unknown = len(vocab)
        out[column_name(CATEGORY, f)] = np.array([vocab.get(str(v), unknown) for v in posts[f]], dtype=np.float32)
    return pd.DataFrame(out)


def categorical_columns() -> list[str]:
    return [column_name(CATEGORY, f) for f in CATEGORICAL_FIELDS]
