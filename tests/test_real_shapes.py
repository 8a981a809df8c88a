"""Shapes of real data the synthetic demo does not have (issue 22): one author without images, and a strong trend
over time. Each runs end to end (prepare, features, stack, report) with the defaults for real data (chronological
folds, held-back slice, guards, refit) and must stay within 1.2x the test MAE of a flat LightGBM on the same posts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from popstack.datamodules.schema import KEY
from popstack.datamodules.synthetic import make_posts, write_smpd
from tests.helpers import compose_fast

FLAT_NUMERIC = ("postdate", "latitude", "longitude", "geoaccuracy", "ispublic", "photo_count", "ispro",
                "photo_firstdate", "photo_firstdatetaken")


def flat_lightgbm_mae(posts: pd.DataFrame, truth: pd.Series) -> float:
    """A plain LightGBM (library defaults) on a flat table of the raw post fields, fitted on every labelled post."""
    import lightgbm as lgb

    X = pd.DataFrame({c: posts[c].astype(float) for c in FLAT_NUMERIC if c in posts})
    for c in ("uid", "category", "subcategory", "concept"):
        X[c] = posts[c].astype("category")
    X["title_len"] = posts.title.str.len()
    X["n_tags"] = posts.alltags.str.split().str.len()
    train = posts.split == "train"
    model = lgb.LGBMRegressor(verbose=-1, random_state=0).fit(X[train], posts.label[train])
    test = posts.split == "test"
    return float(np.mean(np.abs(model.predict(X[test]) - truth[posts.post_id[test]].to_numpy())))


def _write(root: Path, posts: pd.DataFrame, signal, labels, images: bool) -> pd.Series:
    write_smpd(root, posts, signal, labels, seed=0, image_mess=False, write_images=images)
    return pd.Series(labels, index=posts[KEY].to_numpy())


def one_author_without_images(root: Path, n_train: int = 600, n_test: int = 200) -> pd.Series:
    posts, signal, labels = make_posts(n_train, n_test, seed=5, n_users=1)
    return _write(root, posts, signal, labels, images=False)


def strong_trend(root: Path, n_train: int = 600, n_test: int = 200) -> pd.Series:
    posts, signal, labels = make_posts(n_train, n_test, seed=6)
    t = posts.postdate.to_numpy(dtype=float)
    labels = labels + 4.0 * (t - t.min()) / np.ptp(t)  # +4 log-views over the span: about 1.6 label sd
    return _write(root, posts, signal, labels, images=True)


@pytest.mark.slow
@pytest.mark.parametrize("make", [one_author_without_images, strong_trend])
def test_real_shapes_run_end_to_end_within_1_2x_of_a_flat_lightgbm(make, tmp_path):
    from popstack import train

    truth = make(tmp_path / "raw")
    cfg = compose_fast(tmp_path, "data=smpd", f"data.root={tmp_path / 'raw'}", "data.shard_size=500",
                       "n_folds=3", "model.prompt_prototype.enabled=false", "model.hierarchical.enabled=false",
                       "features.sentence_model=",
                       "stacking.pseudo_rounds=0", "stacking.members.catboost.iterations=300",
                       "stacking.members.lightgbm.n_estimators=300")
    train(cfg)
    run = Path(cfg.run_dir)
    posts = pd.read_parquet(run / "posts.parquet")
    preds = pd.read_parquet(run / "predictions.parquet").set_index(KEY)
    test_ids = posts.post_id[posts.split == "test"]
    mae = float(np.mean(np.abs(preds.prediction[test_ids].to_numpy() - truth[test_ids].to_numpy())))
    flat = flat_lightgbm_mae(posts, truth)
    report = (run / "report.md").read_text()
    assert report.index("## Headline") < report.index("## Scores") and "held-back slice" in report
    assert "Fold strategy **time**" in report  # the default for real data
    assert mae <= 1.2 * flat, (mae, flat)
