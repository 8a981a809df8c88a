"""Tabular features: hand-checked values per family, no label leakage, unknown values, saved transforms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from popstack.datamodules.folds import assign_folds
from popstack.datamodules.synthetic import make_posts
from popstack.features.build import build_features, transform_features
from popstack.features.category import category_features
from popstack.features.config import FeatureConfig
from popstack.features.crossmodal import crossmodal_features
from popstack.features.glove import glove_features
from popstack.features.preprocess import Standardiser, iqr_keep_mask
from popstack.features.sentence import SentenceEncoder, resolve_model_dir
from popstack.features.spatial import spatial_features
from popstack.features.state import FeatureState
from popstack.features.target import target_features
from popstack.features.temporal import temporal_features
from popstack.features.text import text_statistics
from popstack.features.user import user_features

NO_SENTENCE = FeatureConfig(sentence_model="", user_vector_dim=3, location_vector_dim=3, user_tag_svd_dim=2,
                            tfidf_dim=2)


def tiny_posts() -> pd.DataFrame:
    """Four posts of two users (u1: 3 posts, u2: 1), hand-checkable."""
    return pd.DataFrame({
        "post_id": ["1", "2", "3", "4"], "uid": ["u1", "u1", "u1", "u2"], "split": ["train", "train", "train", "test"],
        "title": ["Sunset 2015", "", "dog", "a b c"], "alltags": ["sun sea", "#tbt uploaded:by=app", "", "x"],
        "category": ["Food", "Food", "Animal", "Urban"], "subcategory": ["Tea", "Tea", "Dogs", "NewOne"],
        "concept": ["c1", "c1", "c2", "c9"], "mediatype": ["photo"] * 4,
        # 2016-01-04 is a Monday; 13:00, 13:00, 00:00 next day, 23:00
        "postdate": [1451912400, 1451912400, 1451952000, 1451948400],
        "latitude": [10.0, np.nan, np.nan, -5.0], "longitude": [20.0, np.nan, np.nan, 100.0],
        "geoaccuracy": [16, 0, 0, 3], "pathalias": ["al", None, None, None], "ispublic": [1.0] * 4,
        "photo_firstdate": [1451912400 - 10 * 86400] * 3 + [np.nan],
        "photo_firstdatetaken": [1451912400 - 14 * 86400] * 3 + [np.nan],
        "photo_count": [100.0, 100.0, 100.0, np.nan], "ispro": [1.0, 1.0, 1.0, 0.0], "canbuypro": [np.nan] * 4,
        "user_vector": [None] * 4, "location_vector": [None] * 4, "user_text": [None] * 4, "location_text": [None] * 4,
        "label": [4.0, 6.0, 8.0, np.nan],
    })


def test_temporal_values():
    st = FeatureState()
    t = temporal_features(tiny_posts(), st)
    assert t["temporal__hour"].tolist() == [13, 13, 0, 23]
    assert t["temporal__weekday"].tolist() == [0, 0, 1, 0]
    assert t["temporal__week_hour"].tolist() == [13, 13, 24, 23]
    assert t["temporal__days_since_start"].tolist() == pytest.approx([0, 0, 39600 / 86400, 36000 / 86400])
    assert t.dtypes.eq(np.float32).all()


def test_user_values_and_unknown_user():
    st = FeatureState()
    cfg = FeatureConfig(user_tag_svd_dim=0)
    u = user_features(tiny_posts(), st, cfg)
    assert u["user__post_count"].tolist() == [3, 3, 3, 1]
    assert u["user__mean_tags"].tolist() == pytest.approx([4 / 3] * 3 + [1])
    assert u["user__account_age_days"].tolist()[:3] == pytest.approx([10, 10, 10 + 39600 / 86400])
    assert u["user__first_taken_week"].tolist()[:2] == [2, 2]
    assert u["user__alias_present"].tolist() == [1, 1, 1, 0]
    st.fitted = True
    new = tiny_posts().iloc[[3]].assign(uid="stranger")
    again = user_features(new, st, cfg)
    assert again["user__post_count"].tolist() == [1]
    assert again["user__uid_code"].tolist() == [2]  # unknown users share the code after the known ones


def test_spatial_values_missing_coordinates_and_location_vectors():
    posts = tiny_posts()
    posts["location_vector"] = [np.array([1.0, 2.0], np.float32), None, None, np.array([3.0, 0.0], np.float32)]
    state = FeatureState()
    cfg = FeatureConfig(location_vector_dim=0)
    sp_ = spatial_features(posts, state, cfg)
    assert sp_["spatial__has_geo"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert sp_["spatial__geoaccuracy"].tolist() == [16.0, 0.0, 0.0, 3.0]
    assert np.isnan(sp_["spatial__latitude"][1]) and np.isnan(sp_["spatial__geo_x"][2])
    lat, lon = np.radians(10.0), np.radians(20.0)
    assert sp_["spatial__geo_x"][0] == pytest.approx(np.cos(lat) * np.cos(lon), rel=1e-6)
    assert sp_["spatial__geo_y"][0] == pytest.approx(np.cos(lat) * np.sin(lon), rel=1e-6)
    assert sp_["spatial__geo_z"][3] == pytest.approx(np.sin(np.radians(-5.0)), rel=1e-6)
    assert sp_["spatial__location_vec_000"].tolist()[::3] == [1.0, 3.0]  # raw vector columns (dim 0)
    assert np.isnan(sp_["spatial__location_vec_001"][1])  # no location description -> NaN, not zeros
    assert all(sp_[c].dtype == np.float32 for c in sp_.columns)


def test_category_unknown_value_gets_own_code():
    st = FeatureState()
    c = category_features(tiny_posts(), st)
    assert c["category__subcategory"].tolist() == [1, 1, 0, 2]  # vocab (train): Dogs=0, Tea=1; NewOne -> 2


def test_text_statistics_values():
    t = text_statistics(tiny_posts())
    assert t["text__tag_count"].tolist() == [2, 2, 0, 1]
    assert t["text__hashtag_like"].tolist() == [0, 1, 0, 0]
    assert t["text__machine_tags"].tolist() == [0, 1, 0, 0]
    assert t["text__title_empty"].tolist() == [0, 1, 0, 0]
    assert t["text__title_digit_ratio"][0] == pytest.approx(4 / 11)


def test_target_stats_are_out_of_fold_and_smoothed():
    posts = tiny_posts()
    folds = np.array([0, 1, 1, -1])
    st = FeatureState()
    t = target_features(posts, folds, st, prior=1.0)
    # post 1 (fold 0) sees posts 2, 3 (labels 6, 8): global of those = 7, (14 + 1*7) / (2 + 1) = 7
    assert t["target__user_mean"][0] == pytest.approx(7.0)
    # posts 2, 3 (fold 1) see post 1 only: (4 + 4) / 2 = 4
    assert t["target__user_mean"][1] == pytest.approx(4.0)
    # unknown-label user u2 (test row): no labelled posts -> per fold k the global mean of the other folds' labels
    # (without fold 0: 7; without fold 1: 4), averaged over the folds like every test-row statistic
    assert t["target__user_mean"][3] == pytest.approx(5.5)
    assert t["target__user_label_count"].tolist() == [2, 1, 1, 0]


def test_target_stats_per_other_key_are_out_of_fold_and_refit_for_new_posts():
    posts = tiny_posts().assign(concept=["a", "a", "b", "a"])
    folds = np.array([0, 1, 1, -1])
    st = FeatureState()
    t = target_features(posts, folds, st, prior=0.0, keys=("uid", "concept"))
    assert [c for c in t.columns if c.startswith("target__concept")] == [
        "target__concept_mean", "target__concept_median", "target__concept_label_count"]
    # post 0 (fold 0, concept a) sees fold 1's concept-a post 1 only; post 1 sees post 0 only
    labels = posts.label.to_numpy()
    assert t["target__concept_mean"][0] == pytest.approx(labels[1])
    assert t["target__concept_mean"][1] == pytest.approx(labels[0])
    # the test post: per fold k the other folds' concept-a posts (one each), averaged -> 1, like a training post
    assert t["target__concept_label_count"].tolist() == [1, 1, 0, 1]
    st.fitted = True
    again = target_features(posts, None, st, prior=0.0, keys=("uid", "concept"))
    assert again["target__concept_mean"][3] == pytest.approx(labels[:2].mean())
    with pytest.raises(ValueError, match="target_keys"):
        target_features(posts, folds, FeatureState(), prior=0.0, keys=("title",))


def test_no_leakage_from_validation_labels():
    posts, _, _ = make_posts(120, 30, 0, n_subcategories=4)
    folds = assign_folds(posts.label.to_numpy(), 3, 0)
    base = build_features(posts, folds, NO_SENTENCE).frame
    changed = posts.copy()
    changed.loc[folds == 1, "label"] = 1.0  # rewrite fold 1's labels
    other = build_features(changed, folds, NO_SENTENCE).frame
    np.testing.assert_array_equal(base[folds == 1].drop(columns="post_id").to_numpy(),
                                  other[folds == 1].drop(columns="post_id").to_numpy())
    assert not np.array_equal(base[folds == 0].drop(columns="post_id").to_numpy(),
                              other[folds == 0].drop(columns="post_id").to_numpy())  # the others do see them


def test_saved_state_reproduces_features_for_new_posts(tmp_path):
    posts, _, _ = make_posts(80, 20, 1, n_subcategories=4)
    folds = assign_folds(posts.label.to_numpy(), 2, 0)
    fs = build_features(posts, folds, NO_SENTENCE)
    fs.save(tmp_path / "f")
    state = FeatureState.load(tmp_path / "f" / "state")
    test = posts[posts.split == "test"]
    again = transform_features(test, state, NO_SENTENCE)
    expected = fs.frame[posts.split.to_numpy() == "test"].reset_index(drop=True)
    assert list(again.columns) == list(fs.frame.columns)
    np.testing.assert_allclose(again.drop(columns="post_id").to_numpy(), expected.drop(columns="post_id").to_numpy(),
                               rtol=1e-5, atol=1e-5)
    assert set(fs.families.values()) >= {"user", "temporal", "spatial", "category", "text", "target"}
    assert all(fs.frame[c].dtype == np.float32 for c in fs.families)


def test_sentence_encoder_family_is_offline_and_deterministic():
    posts = tiny_posts()
    cfg = FeatureConfig(sentence_model="minilm", sentence_dim=2, user_tag_svd_dim=0, tfidf_dim=0)
    fs = build_features(posts, np.array([0, 1, 0, -1]), cfg)
    cols = [c for c in fs.families if c.startswith("sentence__")]
    assert len(cols) == 2 and np.isfinite(fs.frame[cols].to_numpy()).all()
    again = transform_features(posts, fs.state, cfg)
    np.testing.assert_allclose(again[cols].to_numpy(), fs.frame[cols].to_numpy(), atol=1e-5)


def test_sentence_encoder_encodes_each_distinct_text_once_in_input_order():
    class TokenizerSpy:
        def __init__(self, tokenizer):
            self.tokenizer, self.seen = tokenizer, []

        def __call__(self, texts, **kw):
            self.seen += list(texts)
            return self.tokenizer(texts, **kw)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    enc = SentenceEncoder(resolve_model_dir("minilm"), max_length=64, batch_size=2)
    enc.tokenizer = spy = TokenizerSpy(enc.tokenizer)
    texts = ["red bike in the rain", "", "sunset", "red bike in the rain", "sunset", "a dog on a long beach walk"]
    out = enc.encode(texts)
    assert sorted(spy.seen) == sorted(set(texts))  # duplicates encoded once
    assert out.shape == (6, enc.model.config.hidden_size) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], out[3])
    np.testing.assert_array_equal(out[2], out[4])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    single = SentenceEncoder(resolve_model_dir("minilm"), max_length=64, batch_size=1)
    one_by_one = np.vstack([single.encode([t]) for t in texts])
    np.testing.assert_allclose(out, one_by_one, atol=1e-5)  # padding and batching do not change a row
    assert enc.encode([]).shape == (0, enc.model.config.hidden_size)


def test_glove_mean_vectors(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text("sun 1 0\nsea 0 1\ndog 2 2\n")
    g = glove_features(tiny_posts(), path)
    assert g["glove__tags_000"][0] == pytest.approx(0.5) and g["glove__tags_001"][0] == pytest.approx(0.5)
    assert np.isnan(g["glove__tags_000"][2])  # no tags
    assert g["glove__title_000"][2] == pytest.approx(2.0)


def test_crossmodal_cosine():
    img = np.array([[1.0, 0.0], [1.0, 1.0]])
    txt = np.array([[2.0, 0.0], [-1.0, -1.0]])
    c = crossmodal_features(img, txt, has_image=np.array([True, False]))
    assert c.iloc[0, 0] == pytest.approx(1.0) and np.isnan(c.iloc[1, 0])


def test_standardiser_and_iqr(tmp_path):
    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0], "b": [5.0, 5.0, 5.0]})
    s = Standardiser.fit(frame)
    x = s.transform(frame)
    assert x[1, 0] == pytest.approx(0.0) and np.all(x[:, 1] == 0)
    s.save(tmp_path / "s.npz")
    np.testing.assert_array_equal(Standardiser.load(tmp_path / "s.npz").transform(frame), x)
    keep = iqr_keep_mask(np.array([1, 2, 3, 4, 100.0]), k=1.5)
    assert keep.tolist() == [True, True, True, True, False]


def test_extra_columns_become_the_extra_family_and_keep_for_new_posts(tmp_path):
    from popstack.datamodules.smpd import read_posts, write_posts

    posts, _, _ = make_posts(60, 20, 2, n_subcategories=4)
    rng = np.random.default_rng(0)
    posts["extra_num__followers"] = rng.normal(size=len(posts))
    posts.loc[3, "extra_num__followers"] = np.nan
    posts["extra_cat__device"] = rng.choice(["ios", "android"], size=len(posts)).astype(object)
    posts.loc[posts.index[-1], "extra_cat__device"] = "web"  # a test post: unseen in training
    folds = assign_folds(posts.label.to_numpy(), 2, 0)
    fs = build_features(posts, folds, NO_SENTENCE)
    assert fs.families["extra__followers"] == fs.families["extra__device"] == "extra"
    assert "extra__device" in fs.categorical and "extra__followers" not in fs.categorical
    np.testing.assert_allclose(fs.frame["extra__followers"], posts["extra_num__followers"].astype(np.float32))
    codes = fs.frame["extra__device"].to_numpy()
    assert codes[-1] == 2 and set(codes[:-1]) == {0, 1}  # android, ios; web -> the vocabulary size
    fs.save(tmp_path / "f")
    state = FeatureState.load(tmp_path / "f" / "state")
    test = posts[posts.split == "test"]
    again = transform_features(test, state, NO_SENTENCE)
    expected = fs.frame[posts.split.to_numpy() == "test"].reset_index(drop=True)
    np.testing.assert_allclose(again["extra__device"], expected["extra__device"])
    lacking = transform_features(test.drop(columns=["extra_num__followers"]), state, NO_SENTENCE)
    assert lacking["extra__followers"].isna().all()
    # posts.parquet keeps the extra columns after the schema's
    from popstack.datamodules.schema import COLUMNS
    from popstack.datamodules.sources import check_posts

    table = check_posts(pd.DataFrame({c: posts[c] if c in posts else None for c in COLUMNS}).assign(
        image_relpath="", image_status="missing", row=0, geoaccuracy=posts.geoaccuracy.astype(np.int64),
        postdate=posts.postdate.astype(np.int64), extra_num__followers=posts.extra_num__followers,
        extra_cat__device=posts.extra_cat__device), tmp_path)
    write_posts(table, tmp_path / "posts.parquet")
    back = read_posts(tmp_path / "posts.parquet")
    assert list(back.columns[-2:]) == ["extra_num__followers", "extra_cat__device"]
    assert back.extra_cat__device.tolist() == posts.extra_cat__device.tolist()
