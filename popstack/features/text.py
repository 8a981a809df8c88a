"""Text family: title/tag statistics and TF-IDF (1-2 grams) + TruncatedSVD of tags and of titles.

TF-IDF uses no labels, so it is fitted on every post of the training run (train + test text).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.preprocessing import normalize

from popstack.features.config import FeatureConfig
from popstack.features.families import TEXT, column_name
from popstack.features.reduce import fit_or_apply_svd
from popstack.features.state import FeatureState

MACHINE_TAG = re.compile(r"^[\w.-]+:[\w.-]+=")
TOKEN_PATTERN = r"(?u)\b\w[\w:=.-]*\b"


def _stats(text: pd.Series, prefix: str) -> dict[str, np.ndarray]:
    s = text.fillna("")
    n_chars = s.str.len().to_numpy(dtype=np.float64)
    words = s.str.split()
    safe = np.maximum(n_chars, 1)
    return {
        f"{prefix}_chars": n_chars,
        f"{prefix}_words": words.str.len().to_numpy(dtype=np.float64),
        f"{prefix}_empty": (n_chars == 0).astype(np.float64),
        f"{prefix}_digit_ratio": s.str.count(r"\d").to_numpy() / safe,
        f"{prefix}_upper_ratio": s.str.count(r"[A-Z]").to_numpy() / safe,
    }


def text_statistics(posts: pd.DataFrame) -> pd.DataFrame:
    tags = posts["alltags"].fillna("").str.split()
    cols = {
        **_stats(posts["title"], "title"),
        **_stats(posts["alltags"], "tags"),
        "tag_count": tags.str.len().to_numpy(dtype=np.float64),
        "hashtag_like": np.array([sum(t.startswith("#") for t in ts) for ts in tags], dtype=np.float64),
        "machine_tags": np.array([sum(bool(MACHINE_TAG.match(t)) for t in ts) for ts in tags], dtype=np.float64),
        "title_in_tags": np.array([float(bool(t) and t.lower() in a.lower()) for t, a in
                                   zip(posts["title"].fillna(""), posts["alltags"].fillna(""))]),
    }
    return pd.DataFrame({column_name(TEXT, k): v.astype(np.float32) for k, v in cols.items()})


def tfidf_svd(texts: pd.Series, name: str, state: FeatureState, cfg: FeatureConfig) -> pd.DataFrame:
    """TF-IDF (vocabulary and idf stored in the state) projected on ``cfg.tfidf_dim`` SVD components."""
    key = f"{TEXT}.tfidf_{name}"
    docs = texts.fillna("").tolist()
    if not state.fitted:
        fitted = TfidfVectorizer(ngram_range=(1, 2), max_features=cfg.tfidf_max_features, min_df=2,
                                 token_pattern=TOKEN_PATTERN).fit(docs)
        if not fitted.vocabulary_:  # tiny corpora: fall back to min_df=1
            fitted = TfidfVectorizer(ngram_range=(1, 2), token_pattern=TOKEN_PATTERN).fit(docs)
        state.meta[f"{key}.vocab"] = {t: int(i) for t, i in fitted.vocabulary_.items()}
        state.arrays[f"{key}.idf"] = fitted.idf_.astype(np.float64)
    counts = CountVectorizer(ngram_range=(1, 2), vocabulary=state.meta[f"{key}.vocab"],
                             token_pattern=TOKEN_PATTERN).transform(docs).astype(np.float64)
    tfidf = normalize(counts.multiply(state.arrays[f"{key}.idf"]).tocsr())
    emb = fit_or_apply_svd(tfidf, cfg.tfidf_dim, state, key, cfg.seed)
    return pd.DataFrame(emb, columns=[column_name(TEXT, f"tfidf_{name}_{j:02d}") for j in range(emb.shape[1])])


def text_features(posts: pd.DataFrame, state: FeatureState, cfg: FeatureConfig) -> pd.DataFrame:
    blocks = [text_statistics(posts)]
    if cfg.tfidf_dim > 0:
        blocks += [tfidf_svd(posts["alltags"], "tags", state, cfg), tfidf_svd(posts["title"], "title", state, cfg)]
    return pd.concat(blocks, axis=1)
