"""Train/test parity of the tabular features (issue 22, point 2): a test post's features are computed the way a
training post's are, so on data without drift their distributions agree; nothing constant in training survives."""

from __future__ import annotations

import numpy as np
import pandas as pd

from popstack.datamodules.folds import assign_folds
from popstack.datamodules.schema import KEY, NO_FOLD
from popstack.datamodules.synthetic import make_posts
from popstack.features.build import build_features, constant_columns, transform_features
from popstack.features.config import FeatureConfig
from popstack.features.preprocess import Standardiser

FAST = FeatureConfig(sentence_model="", user_vector_dim=3, location_vector_dim=3, user_tag_svd_dim=2, tfidf_dim=2)


def _no_drift_posts(n: int = 6000, seed: int = 0) -> pd.DataFrame:
    """Synthetic posts whose test half is a random half of all posts (no time gap between train and test)."""
    posts, _, labels = make_posts(n, 0, seed)
    test = np.random.default_rng(seed).permutation(n)[: n // 2]
    posts = posts.assign(label=labels)
    posts.loc[test, "label"] = np.nan
    posts.loc[test, "split"] = "test"
    return posts


def smd(a: np.ndarray, b: np.ndarray) -> float:
    """|mean(a) - mean(b)| over the pooled standard deviation (NaN ignored; 0 when both are constant)."""
    sd = np.sqrt((np.nanvar(a) + np.nanvar(b)) / 2)
    return 0.0 if sd == 0 else float(abs(np.nanmean(a) - np.nanmean(b)) / sd)


def test_oof_training_rows_and_test_rows_agree_and_no_column_is_constant_in_training():
    posts = _no_drift_posts()
    folds = assign_folds(posts.label.to_numpy(), 5, seed=0)
    fs = build_features(posts, folds, FAST)  # no image directory: the image family is NaN everywhere
    train, test = folds != NO_FOLD, folds == NO_FOLD
    frame = fs.frame.drop(columns=[KEY])
    assert not constant_columns(fs.frame, train)
    assert not any(c.startswith("image_stats__") for c in frame.columns)  # all-NaN in training: dropped
    gaps = {c: smd(frame.loc[train, c].to_numpy(), frame.loc[test, c].to_numpy()) for c in frame.columns}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] < 0.1, (worst, gaps[worst])
    # new posts through the saved state get the same kind of statistics (and the same columns)
    again = transform_features(posts[test].reset_index(drop=True), fs.state, FAST)
    assert list(again.columns) == list(fs.frame.columns)
    np.testing.assert_allclose(again.filter(like="target__").to_numpy(),
                               fs.frame.loc[test].filter(like="target__").to_numpy(), rtol=1e-5)


def test_test_rows_label_count_is_the_mean_over_folds_of_k_minus_1_folds():
    """One user, K = 4 folds of 3 posts each: a training row counts 9 labels; a test row must count 9 too, not 12."""
    posts, _, labels = make_posts(24, 0, seed=1, n_users=5)
    posts = posts.assign(uid="only", label=labels)
    posts.loc[12:, "label"] = np.nan
    folds = np.array([0, 1, 2, 3] * 3 + [NO_FOLD] * 12)
    fs = build_features(posts, folds, FeatureConfig(sentence_model="", user_tag_svd_dim=0, tfidf_dim=0))
    assert "target__user_label_count" not in fs.frame  # 9 on every training row: constant, dropped
    means = fs.frame["target__user_mean"].to_numpy()
    per_fold = [(labels[:12][folds[:12] != k].sum() + 10 * labels[:12][folds[:12] != k].mean()) / (9 + 10)
                for k in range(4)]
    np.testing.assert_allclose(means[12:], np.mean(per_fold), rtol=1e-5)


def test_standardiser_clips_to_the_configured_range_and_keeps_it_saved(tmp_path):
    train = pd.DataFrame({"a": np.arange(100.0), "b": np.ones(100)})
    scaler = Standardiser.fit(train, clip=5.0)
    far = pd.DataFrame({"a": [1e6, -1e6, 50.0], "b": [1000.0, 1.0, 1.0]})
    z = scaler.transform(far)
    assert z.max() == 5.0 and z.min() == -5.0
    assert abs(z[2, 0]) < 0.1
    scaler.save(tmp_path / "s.npz")
    np.testing.assert_array_equal(Standardiser.load(tmp_path / "s.npz").transform(far), z)
    assert np.abs(Standardiser.fit(train).transform(far)).max() > 1e4  # unclipped when asked


def test_no_readable_image_skips_the_image_family_with_one_line(caplog, monkeypatch):
    import popstack.features.build as build

    posts, _, labels = make_posts(200, 50, seed=2)
    folds = assign_folds(posts.label.to_numpy(), 3, seed=0)
    calls = []
    monkeypatch.setattr(build, "shard_image_statistics", lambda d: calls.append(d))
    cfg = FeatureConfig(sentence_model="", user_tag_svd_dim=0, tfidf_dim=0, image_stats=True)
    with caplog.at_level("INFO", logger="popstack"):
        fs = build_features(posts.assign(image_status="missing"), folds, cfg, image_dir="shards")
    assert [r.message for r in caplog.records].count(
        "features: no post has a readable image; the image-statistics family is skipped") == 1
    assert not calls and not any(c.startswith("image_stats__") for c in fs.frame.columns)
    transform_features(posts.assign(image_status="ok"), fs.state, cfg, image_dir="shards")
    assert not calls  # new posts follow the fit's decision
    build_features(posts.assign(image_status="ok"), folds, cfg, image_dir="shards")
    assert calls == ["shards"]  # with readable images the family is computed
