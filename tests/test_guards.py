"""Members that cannot explode and a submission that uses every label (issue 22, points 3 and 4)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from popstack.datamodules.folds import assign_folds
from popstack.datamodules.schema import NO_FOLD
from popstack.stacking import stack as stack_module
from popstack.stacking.config import GuardConfig, members_config
from popstack.stacking.members.lightgbm import LightGBMMember
from popstack.stacking.stack import StackConfig, predict_stack, run_stack
from tests.test_stacking import FAST

GUARD = {"label_margin": 0.1, "max_outside": 0.01, "max_error_ratio": 1.5}


def _data(n=300, n_held=60, n_test=60, seed=0):
    """Rows: labelled with a fold, then the held-back slice (labels, no fold), then test rows (no label)."""
    rng = np.random.default_rng(seed)
    m = n + n_held + n_test
    X = pd.DataFrame(rng.normal(size=(m, 4)).astype(np.float32), columns=[f"f{i}" for i in range(4)])
    y = 6 + 2 * X.f0.to_numpy() + rng.normal(0, 0.3, m)
    y[n + n_held:] = np.nan
    folds = assign_folds(np.where(np.arange(m) < n, y, np.nan), 3, seed)
    return X, y, folds


def test_a_neural_member_predicting_outside_the_label_range_is_dropped_and_clipped(tmp_path):
    X, y, folds = _data()
    labelled = folds != NO_FOLD
    X["neural_pred"] = np.where(labelled, y + 0.1, 200.0).astype(np.float32)  # fine out of fold, explodes on test
    cfg = StackConfig(members=members_config({"lightgbm": FAST["lightgbm"]}), neural_columns=["neural_pred"],
                      pseudo_rounds=0, iqr_k=0, guard=GuardConfig(**GUARD), refit_full=False)
    res = run_stack(X, y, folds, [], cfg)
    assert res.dropped.member.tolist() == ["neural_pred"]
    assert "outside the training label range" in res.dropped.reason[0]
    assert res.blend_members == ["lightgbm"]
    assert set(res.weights.member) == {"lightgbm"}
    assert res.test["blend"].max() < 20  # the blend never sees the 200s
    hi = np.nanmax(y[labelled]) + 0.1 * np.ptp(y[labelled])
    assert res.test["neural_pred"].max() <= hi + 1e-9  # the member's own predictions are clipped too
    res.save(tmp_path)
    np.testing.assert_allclose(predict_stack(tmp_path, X[~labelled]), res.test["blend"], rtol=1e-6)
    # ... and named in the report, with the reason
    from popstack.pipeline.layout import RunLayout
    from popstack.pipeline.stages.report import guard_text

    layout = RunLayout(tmp_path / "run")
    layout.dropped_members.parent.mkdir(parents=True)
    res.dropped.to_csv(layout.dropped_members, index=False)
    text = guard_text(layout)
    assert "Left out of the blend" in text and "| neural_pred | " in text and "outside the training label" in text


def test_headline_is_the_held_back_score_and_a_worse_blend_is_said_loudly():
    from popstack.pipeline.stages.report import blend_warning, headline

    scores = pd.DataFrame({"member": ["lightgbm", "catboost", "blend"], "oof_src": [0.9, 0.9, 0.92],
                           "oof_mae": [0.5, 0.5, 0.45], "heldback_src": [0.4, 0.3, 0.35],
                           "heldback_mae": [1.0, 1.2, 1.1], "seconds": [1.0, 1.0, 2.0]})
    assert headline(scores) == {"src": 0.35, "mae": 1.1, "source": "held-back slice"}
    warning = blend_warning(scores)
    assert warning.startswith("WARNING") and "lightgbm 1.0000" in warning
    assert blend_warning(scores.assign(heldback_mae=[1.0, 1.2, 0.9])) is None
    no_slice = scores.assign(heldback_src=np.nan, heldback_mae=np.nan)
    assert headline(no_slice) == {"src": 0.92, "mae": 0.45, "source": "out-of-fold"}
    assert blend_warning(no_slice) is None


def test_a_blend_no_better_than_a_constant_on_the_held_back_slice_is_said_loudly():
    """The constant is the median of the labels the stack fitted (posts with a fold, not held back, not test)."""
    from popstack.datamodules.folds import HOLDOUT
    from popstack.pipeline.stages.report import baseline_warning, constant_baseline

    labels = np.array([1.0, 2.0, 3.0, 100.0, 4.0, 6.0, np.nan])
    folds = pd.DataFrame({"fold": [0, 1, 0, 1, NO_FOLD, NO_FOLD, NO_FOLD],
                          HOLDOUT: [False, False, False, False, True, True, False]})
    constant = constant_baseline(labels, folds)  # median(1, 2, 3, 100) = 2.5 -> |4 - 2.5|, |6 - 2.5|
    assert constant == 2.5
    scores = pd.DataFrame({"member": ["lightgbm", "blend"], "oof_src": [0.9, 0.9], "oof_mae": [0.5, 0.5],
                           "heldback_src": [0.1, 0.1], "heldback_mae": [2.4, 2.6], "seconds": [1.0, 1.0]})
    warning = baseline_warning(scores, constant)
    assert warning.startswith("WARNING") and "2.6000 vs constant 2.5000" in warning
    assert baseline_warning(scores.assign(heldback_mae=[2.4, 2.4]), constant) is None
    no_slice = folds.assign(**{HOLDOUT: False})
    assert np.isnan(constant_baseline(labels, no_slice))
    assert baseline_warning(scores, float("nan")) is None


def test_a_member_far_worse_on_the_latest_validation_rows_is_dropped():
    X, y, folds = _data()
    labelled = folds != NO_FOLD
    latest = np.zeros(len(y), bool)
    latest[np.flatnonzero(labelled)[-60:]] = True
    bad = np.where(latest, y + 5.0, y + 0.2)  # fine on earlier rows, far off on the latest ones
    X["neural_pred"] = np.where(labelled, bad, 6.0).astype(np.float32)
    cfg = StackConfig(members=members_config({"lightgbm": FAST["lightgbm"]}), neural_columns=["neural_pred"],
                      pseudo_rounds=0, iqr_k=0, guard=GuardConfig(**GUARD), refit_full=False)
    res = run_stack(X, y, folds, [], cfg, latest=latest)
    assert res.dropped.member.tolist() == ["neural_pred"]
    assert "latest validation rows" in res.dropped.reason[0]
    assert run_stack(X, y, folds, [], cfg).dropped.empty  # no latest rows given: only the range guard decides


def test_the_refit_uses_the_held_back_labels_and_validation_never_sees_them(monkeypatch, tmp_path):
    X, y, folds = _data()
    held = (folds == NO_FOLD) & ~np.isnan(y)
    y = y.copy()
    y[held] += 1000 + np.arange(held.sum()) * 1e-3  # labels no other row has
    fits = []

    class Spy(LightGBMMember):
        def fit(self, X_tr, y_tr, X_va, y_va):
            fits.append((np.asarray(y_tr), None if y_va is None else np.asarray(y_va)))
            return super().fit(X_tr, y_tr, X_va, y_va)

    monkeypatch.setattr(stack_module, "make_member", lambda kind, params, cats, seed: Spy(params, cats, seed))
    cfg = StackConfig(members=members_config({"lightgbm": FAST["lightgbm"]}), pseudo_rounds=0, iqr_k=0,
                      guard=GuardConfig(**GUARD), refit_full=True)
    res = run_stack(X, y, folds, [], cfg)
    validated = [f for f in fits if f[1] is not None]
    refits = [f for f in fits if f[1] is None]
    assert len(validated) == 3 and len(refits) == 1
    for y_tr, y_va in validated:  # no held-back label in any fold's training or validation part
        assert (y_tr < 500).all() and (y_va < 500).all()
    assert np.isin(y[held], refits[0][0]).all()  # every held-back label reaches the final fit
    assert len(refits[0][0]) == int((folds != NO_FOLD).sum() + held.sum())
    best = np.mean([res.models[("lightgbm", k)].best_rounds() for k in range(3)])
    assert res.refit_rounds["lightgbm"] == round(best * 360 / 200)  # scaled to the larger data
    # held-back rows keep their validation predictions (fold means, < 500); test rows come from the refit
    unl = res.test["blend"].to_numpy()
    held_u, test_u = held[folds == NO_FOLD], ~held[folds == NO_FOLD]
    assert (unl[held_u] < 500).all() and (unl[test_u] > 100).mean() > 0.5
    res.save(tmp_path)
    X_test = X[(folds == NO_FOLD) & ~held]
    np.testing.assert_allclose(predict_stack(tmp_path, X_test), unl[test_u], rtol=1e-6)
