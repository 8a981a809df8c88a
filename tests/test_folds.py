"""Fold strategies (random | time | user) and the held-back chronological slice."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from popstack.datamodules.folds import HOLDOUT, assign_folds, fold_table, holdout_mask, read_folds, write_folds
from popstack.datamodules.schema import KEY, LABEL, NO_FOLD


def posts(n=300, n_test=50, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.normal(6, 2, n + n_test)
    label[n:] = np.nan
    return pd.DataFrame({KEY: [str(i) for i in range(n + n_test)], LABEL: label,
                         "postdate": rng.integers(1_400_000_000, 1_500_000_000, n + n_test),
                         "uid": [f"u{int(u)}" for u in rng.zipf(1.6, n + n_test) % 40]})


def test_time_folds_are_chronological_blocks():
    p = posts()
    f = fold_table(p, 5, 0, "time")["fold"].to_numpy()
    labelled = f != NO_FOLD
    assert labelled.sum() == 300 and (f[300:] == NO_FOLD).all()
    dates = p.postdate.to_numpy()
    for k in range(4):  # every post of fold k is no later than every post of fold k+1
        assert dates[f == k].max() <= dates[f == k + 1].min()
    assert np.ptp(np.bincount(f[labelled])) <= 1


def test_user_folds_never_share_a_user():
    p = posts()
    f = fold_table(p, 4, 1, "user")["fold"].to_numpy()
    labelled = f != NO_FOLD
    per_user = pd.DataFrame({"uid": p.uid[labelled], "fold": f[labelled]}).groupby("uid").fold.nunique()
    assert (per_user == 1).all()
    assert set(f[labelled]) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="users"):
        assign_folds(np.ones(10), 5, 0, "user", uid=np.array(["a", "b"] * 5))


def test_holdout_is_the_latest_labelled_slice_and_has_no_fold(tmp_path):
    p = posts()
    table = fold_table(p, 5, 0, "random", holdout_fraction=0.1)
    held = table[HOLDOUT].to_numpy()
    assert held.sum() == 30 and not held[300:].any()
    dates = p.postdate.to_numpy()
    in_folds = table.fold.to_numpy() != NO_FOLD
    assert dates[held].min() >= dates[in_folds].max()
    assert (table.fold.to_numpy()[held] == NO_FOLD).all() and in_folds.sum() == 270
    write_folds(table, tmp_path / "folds.parquet")
    pd.testing.assert_frame_equal(read_folds(tmp_path / "folds.parquet"), table)
    assert not holdout_mask(p[LABEL].to_numpy(), dates, 0.0).any()
    with pytest.raises(ValueError, match="holdout_fraction"):
        holdout_mask(p[LABEL].to_numpy(), dates, 1.0)


def test_target_statistics_never_read_held_back_labels():
    """A held-back post's label must not reach the user label means of any other post."""
    from popstack.features.state import FeatureState
    from popstack.features.target import target_features

    p = posts(n=60, n_test=0)
    p["uid"] = "same-user"
    table = fold_table(p, 3, 0, "random", holdout_fraction=0.2)
    held = table[HOLDOUT].to_numpy()
    base = target_features(p, table.fold.to_numpy(), FeatureState(), prior=0.0)
    moved = p.assign(**{LABEL: np.where(held, p[LABEL] + 100.0, p[LABEL])})
    again = target_features(moved, table.fold.to_numpy(), FeatureState(), prior=0.0)
    pd.testing.assert_frame_equal(base, again)
