"""Extra family: the user's own per-post columns a data source carries (``datamodules.schema``: ``extra_num__<name>``
numbers, ``extra_cat__<name>`` categories; e.g. ``data=table``'s ``extra_numeric`` / ``extra_categorical``).

Numbers pass as they are (NaN stays NaN: the tree members handle it); a category becomes the integer code of its
value in the training split's sorted values (a value unseen there gets its own code, the vocabulary size) and is
declared categorical to the stack. The state records the columns the training run had: new posts get the same
columns (NaN where they lack one).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from popstack.datamodules.schema import EXTRA_CATEGORICAL, EXTRA_NUMERIC, extra_columns
from popstack.features.families import EXTRA, column_name
from popstack.features.state import FeatureState

COLUMNS_KEY = f"{EXTRA}.columns"


def fitted_columns(posts: pd.DataFrame, state: FeatureState) -> list[str]:
    """The extra columns of the training run: those of ``posts`` when fitting (recorded in the state), else the
    recorded ones (none for a run saved before this family existed)."""
    if not state.fitted:
        state.meta[COLUMNS_KEY] = extra_columns(posts.columns)
    return list(state.meta[COLUMNS_KEY]) if COLUMNS_KEY in state.meta else []


def extra_features(posts: pd.DataFrame, state: FeatureState) -> pd.DataFrame:
    """One feature per extra column of the training run (``extra__<name>``)."""
    out = {}
    for col in fitted_columns(posts, state):
        name = column_name(EXTRA, col.split("__", 1)[1])
        if col.startswith(EXTRA_NUMERIC):
            out[name] = (posts[col].to_numpy(dtype=np.float32) if col in posts
                         else np.full(len(posts), np.nan, dtype=np.float32))
            continue
        key = f"{EXTRA}.vocab.{col}"
        values = posts[col].astype(str) if col in posts else pd.Series([""] * len(posts))
        if not state.fitted:
            state.meta[key] = sorted(values[(posts["split"] == "train").to_numpy()].unique())
        vocab = {v: i for i, v in enumerate(state.meta[key])}
        out[name] = np.array([vocab.get(v, len(vocab)) for v in values], dtype=np.float32)
    return pd.DataFrame(out, index=range(len(posts)))


def extra_categorical_columns(posts: pd.DataFrame, state: FeatureState) -> list[str]:
    """The feature columns of the extra categories (for the stack's categorical list)."""
    return [column_name(EXTRA, c.split("__", 1)[1]) for c in fitted_columns(posts, state)
            if c.startswith(EXTRA_CATEGORICAL)]
