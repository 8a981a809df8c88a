"""The stacking layer on small synthetic regression data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from popstack.datamodules.folds import assign_folds, train_valid_masks
from popstack.datamodules.schema import NO_FOLD
from popstack.stacking import stack as stack_module
from popstack.stacking.ablation import run_ablations
from popstack.stacking.blend import blend, caruana_weights, fit_weights
from popstack.stacking.config import GuardConfig, members_config
from popstack.stacking.members import NeuralMember, label_bounds
from popstack.stacking.members.catboost import CatBoostMember
from popstack.stacking.members.lightgbm import LightGBMMember
from popstack.stacking.members.tabnet import TabNetMember
from popstack.stacking.pseudo import select_pseudo
from popstack.stacking.selection import loss_based_keep
from popstack.stacking.stack import StackConfig, predict_stack, run_stack

FAST = {
    "catboost": {"iterations": 30, "depth": 3, "learning_rate": 0.2, "loss_function": "Huber:delta=1.0",
                 "eval_metric": "MAE", "early_stopping_rounds": 10, "thread_count": 1},
    "lightgbm": {"objective": "huber", "n_estimators": 60, "learning_rate": 0.2, "num_leaves": 7,
                 "min_data_in_leaf": 5, "early_stopping_rounds": 10, "num_threads": 1},
    "tabnet": {"n_d": 4, "n_a": 4, "n_steps": 2, "max_epochs": 3, "patience": 2, "batch_size": 64,
               "virtual_batch_size": 32},
}


def data(n=240, n_unlabelled=60, seed=0):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n + n_unlabelled, 5)).astype(np.float32), columns=[f"f{i}" for i in range(5)])
    X["cat"] = rng.integers(0, 4, n + n_unlabelled).astype(np.float32)
    y = 6 + 2 * X.f0 + X.f1 ** 2 + X.cat * 0.5 + rng.normal(0, 0.5, n + n_unlabelled)
    y = y.to_numpy().copy()
    y[n:] = np.nan
    folds = assign_folds(y, 3, seed)
    return X, y, folds


def test_folds_disjoint_and_cover_labelled_rows():
    _, y, folds = data()
    labelled = ~np.isnan(y)
    assert (folds[~labelled] == NO_FOLD).all()
    seen = np.zeros(len(y), int)
    for k in range(3):
        tr, va = train_valid_masks(folds, k)
        assert not (tr & va).any()
        seen += va
    assert (seen[labelled] == 1).all() and (seen[~labelled] == 0).all()
    assert np.array_equal(assign_folds(y, 3, 0), folds)


class Memoriser:
    """A member that memorises its training rows (by the unique id in column f0): rows it saw come back exact."""

    name, extension = "memo", "json"

    def fit(self, X_tr, y_tr, X_va, y_va):
        self.table = dict(zip(X_tr.f0.round(6), y_tr))
        self.mean = float(np.mean(y_tr))
        return self

    def predict(self, X):
        return np.array([self.table.get(v, self.mean) for v in X.f0.round(6)])

    def feature_importance(self):
        return None


def test_oof_predictions_never_come_from_a_model_that_saw_the_row(monkeypatch):
    X, y, folds = data()
    monkeypatch.setattr(stack_module, "make_member", lambda kind, params, cats, seed: Memoriser())
    res = run_stack(X, y, folds, [], StackConfig(members=members_config({"lightgbm": {}}), pseudo_rounds=0, iqr_k=0,
                                                 refit_full=False))
    labelled = ~np.isnan(y)
    # a memoriser's OOF prediction is the fold mean, never the row's own label
    assert not np.isclose(res.oof["lightgbm"].to_numpy(), y[labelled]).any()


def test_blend_weights_on_simplex_and_no_worse_than_best_member():
    rng = np.random.default_rng(0)
    y = rng.normal(size=300)
    P = np.column_stack([y + rng.normal(0, 0.5, 300), y + rng.normal(0, 0.5, 300), y + 3.0])
    for method in ("caruana", "mae", "spearman"):
        params = fit_weights(P, y, method)
        w = params["weights"]
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        best = min(np.mean(np.abs(P[:, j] - y)) for j in range(3))
        if method != "spearman":
            assert np.mean(np.abs(blend(P, params) - y)) <= best + 1e-12
    assert caruana_weights(P, y)[2] == 0  # the biased member is never picked


def test_pseudo_labels_never_enter_a_validation_part(monkeypatch):
    X, y, folds = data()
    seen_training_sizes = []

    class Spy(Memoriser):
        def __init__(self, kind):
            self.jitter = 0.1 if kind == "catboost" else 0.0  # members disagree a little, row by row

        def predict(self, X):
            return super().predict(X) + self.jitter * X.f1.to_numpy()

        def fit(self, X_tr, y_tr, X_va, y_va):
            seen_training_sizes.append(len(X_tr))
            assert len(X_va) == len(set(X_va.f0.round(6)) & set(X.f0[:240].round(6)))  # validation: labelled only
            return super().fit(X_tr, y_tr, X_va, y_va)

    monkeypatch.setattr(stack_module, "make_member", lambda kind, params, cats, seed: Spy(kind))
    cfg = StackConfig(members=members_config({"lightgbm": {}, "catboost": {}}), pseudo_rounds=1, iqr_k=0,
                      pseudo_alpha=-10, refit_full=False)
    res = run_stack(X, y, folds, [], cfg)
    selected = int(res.rounds.selected_next[0])
    assert selected == 60  # alpha = -10 keeps every unlabelled post
    labelled_train = [int(train_valid_masks(folds, k)[0].sum()) for k in range(3)]
    assert seen_training_sizes[:6] == [s for s in labelled_train for _ in range(2)]
    assert seen_training_sizes[6:] == [s + selected for s in labelled_train for _ in range(2)]


def test_pseudo_labels_of_a_fold_never_carry_its_own_labels(monkeypatch):
    """Unlabelled posts that duplicate labelled ones: a memoriser of another fold returns the duplicate's label, so
    a pseudo-label from any model but fold k's own would hand fold k its validation labels back."""
    X, y, folds = data()
    X.iloc[240:, :] = X.iloc[:60, :].to_numpy()  # the 60 unlabelled posts copy labelled posts 0..59
    monkeypatch.setattr(stack_module, "make_member", lambda kind, params, cats, seed: Memoriser())
    monkeypatch.setattr(stack_module, "select_pseudo", lambda P, alpha: (np.ones(len(P), bool), 0.0))
    cfg = StackConfig(members=members_config({"lightgbm": {}}), pseudo_rounds=1, iqr_k=0, refit_full=False)
    res = run_stack(X, y, folds, [], cfg)
    dup = np.arange(60)
    pred = res.oof["lightgbm"].to_numpy()[dup]
    fold_mean = np.array([np.mean(y[:240][(folds[:240] != folds[i])]) for i in dup])
    # the validation rows' predictions are the fold's training-label mean, never (a share of) their own label
    np.testing.assert_allclose(pred, fold_mean, atol=0.05)
    assert np.mean(np.abs(pred - y[dup])) >= 0.9 * np.mean(np.abs(fold_mean - y[dup]))


def test_pseudo_labels_of_a_fold_unchanged_when_its_labels_change_with_neural_members(monkeypatch):
    """Fold 0's pseudo-labels come only from models that never saw fold 0's labels: its tree members (fitted on the
    other folds) and the fold-0 neural model. Changing fold 0's labels, and the other neural fold models' outputs
    (they trained on fold 0's labels, and so does the fold mean in the neural column), leaves them as they were."""
    X, y, folds = data()
    unl = np.flatnonzero(folds == NO_FOLD)
    rng = np.random.default_rng(1)

    def inputs(shift_fold0_labels: float, shift_other_models: float):
        yy = y.copy()
        yy[folds == 0] += shift_fold0_labels
        per_fold = {k: 6 + rng_fold[k] + (shift_other_models if k != 0 else 0.0) for k in range(3)}
        XX = X.copy()
        XX["pred_nn"] = np.where(folds == NO_FOLD, 0.0, yy + noise).astype(np.float32)
        XX.loc[unl, "pred_nn"] = np.mean([per_fold[k] for k in range(3)], axis=0).astype(np.float32)
        return XX, yy, {"pred_nn": per_fold}

    noise = rng.normal(0, 0.3, len(y))
    rng_fold = {k: rng.normal(0, 0.5, len(unl)) for k in range(3)}
    seen = []

    class Spy(Memoriser):
        def fit(self, X_tr, y_tr, X_va, y_va):
            fold = int(folds[np.flatnonzero(np.isin(X.f0.round(6), X_va.f0.round(6)))[0]])
            pseudo = np.isin(X_tr.f0.round(6), X.f0.iloc[unl].round(6))
            seen.append((fold, X_tr.f0[pseudo].round(6).tolist(), np.round(y_tr[pseudo], 9).tolist()))
            return super().fit(X_tr, y_tr, X_va, y_va)

    monkeypatch.setattr(stack_module, "make_member", lambda kind, params, cats, seed: Spy())
    cfg = StackConfig(members=members_config({"lightgbm": {}}), neural_columns=["pred_nn"], pseudo_rounds=1, iqr_k=0,
                      pseudo_alpha=-0.5, blend="mae", refit_full=False)
    runs = []
    for shifts in ((0.0, 0.0), (3.0, 2.0)):
        seen.clear()
        XX, yy, per_fold = inputs(*shifts)
        run_stack(XX, yy, folds, [], cfg, neural_unlabelled_by_fold=per_fold)
        runs.append([entry for entry in seen if entry[0] == 0 and entry[1]])  # fold 0, round 1 (with pseudo rows)
    assert runs[0] and runs[0][0][1]  # fold 0 got pseudo-labelled rows
    assert runs[0] == runs[1]


def test_select_pseudo_threshold():
    preds = np.array([[1.0, 1.0], [1.0, 3.0], [2.0, 2.1], [0.0, 5.0]])
    mask, tau = select_pseudo(preds, alpha=0.0)
    assert mask.tolist() == [True, False, False, False]
    assert select_pseudo(preds, alpha=-10.0)[0].all()


def test_loss_based_selection_keeps_lowest_losses():
    keep = loss_based_keep(np.array([5.0, 1.0, 3.0, 0.5]), 0.5)
    assert keep.tolist() == [False, True, False, True]


@pytest.mark.parametrize("cls", [CatBoostMember, LightGBMMember,
                                 pytest.param(TabNetMember, marks=pytest.mark.slow)])
def test_member_save_load_identical(tmp_path, cls):
    X, y, folds = data()
    tr, va = train_valid_masks(folds, 0)
    m = cls(FAST[cls.name], ["cat"], seed=0).fit(X[tr], y[tr], X[va], y[va])
    path = tmp_path / f"m.{m.extension}"
    m.save(path)
    back = cls.load(path)
    np.testing.assert_array_equal(back.predict(X), m.predict(X))
    assert m.feature_importance() is not None


def test_whole_stack_round_trip_seed_and_neural_member(tmp_path):
    X, y, folds = data()
    X["pred_nn"] = np.nan_to_num(y, nan=6.0).astype(np.float32) + 0.3  # a neural member's (OOF) predictions
    cfg = StackConfig(members=members_config({k: FAST[k] for k in ("catboost", "lightgbm")}),
                      neural_columns=["pred_nn"], pseudo_rounds=1, seed=3)
    a = run_stack(X, y, folds, ["cat"], cfg)
    b = run_stack(X, y, folds, ["cat"], cfg)
    np.testing.assert_array_equal(a.test.blend.to_numpy(), b.test.blend.to_numpy())
    np.testing.assert_array_equal(a.oof.blend.to_numpy(), b.oof.blend.to_numpy())
    a.save(tmp_path / "stack")
    again = predict_stack(tmp_path / "stack", X[np.isnan(y)])
    np.testing.assert_allclose(again, a.test.blend.to_numpy(), rtol=1e-6)
    assert set(a.scores.member) == {"catboost", "lightgbm", "pred_nn", "blend"}
    assert isinstance(NeuralMember("pred_nn", None).fit(X, y, X, y), NeuralMember)


def test_blend_beats_members_and_ablation_table():
    X, y, folds = data(n=300)
    cfg = StackConfig(members=members_config({k: FAST[k] for k in ("catboost", "lightgbm")}), pseudo_rounds=1)
    families = {"f0": "user", "f1": "text", "f2": "spatial", "f3": "temporal", "f4": "visual", "cat": "category"}
    groups = {"visual": ("visual",), "metadata": ("user", "temporal", "category"), "textual": ("text",),
              "geolocation": ("spatial",)}
    table = run_ablations(X, y, folds, ["cat"], families, groups, cfg)
    assert len(table) == 9
    full = table.set_index("variant").loc["full"]
    no_meta = table.set_index("variant").loc["w/o metadata"]
    assert no_meta.src < full.src  # f0 (the strongest signal) is "user" metadata
    assert table.variant.str.startswith("w/o ensemble").any()


def test_concurrent_fits_equal_one_at_a_time():
    """n_jobs=2 runs (fold, member) fits on two threads: same predictions, weights and rounds as one at a time."""
    X, y, folds = data()
    members = {k: dict(v, thread_count="auto") if k == "catboost" else dict(v, num_threads="auto")
               for k, v in FAST.items() if k != "tabnet"}
    runs = [run_stack(X, y, folds, ["cat"], StackConfig(members=members_config(members), pseudo_rounds=1, n_jobs=jobs))
            for jobs in (1, 2)]
    pd.testing.assert_frame_equal(runs[0].oof, runs[1].oof)
    pd.testing.assert_frame_equal(runs[0].test, runs[1].test)
    pd.testing.assert_frame_equal(runs[0].weights, runs[1].weights)
    assert runs[0].rounds.drop(columns="member_seconds").equals(runs[1].rounds.drop(columns="member_seconds"))


def test_concurrent_fits_share_the_cores():
    from popstack.stacking.members import available_cores, cores_per_fit, fit_cores, fit_params, fit_threads
    from popstack.stacking.stack import concurrent_fits

    assert concurrent_fits(3, 100, 1) == 3 and concurrent_fits(4, 2, 1) == 2  # never more than the fits
    assert concurrent_fits("auto", 100, 10**4) == 1  # a fit on every core runs alone
    assert concurrent_fits("auto", 100, 1) == available_cores()
    assert fit_threads("lightgbm", {"num_threads": "auto"}, 10**8, 4) == 4  # a huge fit takes every core
    assert fit_threads("catboost", {"thread_count": 2}, 10, 4) == 2  # an explicit count is kept
    with pytest.raises(ValueError, match="n_jobs"):
        concurrent_fits(0, 10, 10)
    with fit_cores(1):
        assert cores_per_fit() == 1
        assert fit_params({"num_threads": "auto"}, 10**8, "learning_rate", "num_threads") == {"num_threads": 1}


def test_concurrent_tabnet_fits_leave_stdout_alone():
    """TabNet silences its own print by redirecting stdout; fits on two threads must not leave it redirected."""
    import sys

    X, y, folds = data()
    before = sys.stdout
    cfg = StackConfig(members=members_config({"tabnet": FAST["tabnet"]}), pseudo_rounds=0, n_jobs=2)
    run_stack(X, y, folds, ["cat"], cfg)
    assert sys.stdout is before


def test_extra_params_reach_the_library():
    """``stacking.members.<name>.extra`` is handed to the library as it is (here: LightGBM's bagging)."""
    X, y, folds = data()
    tr, va = train_valid_masks(folds, 0)
    params = {**FAST["lightgbm"], "extra": {"bagging_fraction": 0.5, "bagging_freq": 1}}
    m = LightGBMMember(params, ["cat"], seed=0).fit(X[tr], y[tr], X[va], y[va])
    assert m.booster.params["bagging_fraction"] == 0.5 and m.booster.params["bagging_freq"] == 1
    plain = LightGBMMember(FAST["lightgbm"], ["cat"], seed=0).fit(X[tr], y[tr], X[va], y[va])
    assert not np.array_equal(m.predict(X[va]), plain.predict(X[va]))


def test_catboost_huber_stays_in_the_label_range_with_a_spike_far_from_the_median():
    """A third of the labels are 0, the rest about 6 (a strike height of 0 feet, a post nobody saw): under Huber the
    zero rows sit beyond delta from the median, where the loss's second derivative is 0. With CatBoost's Newton
    leaves a leaf of such rows steps by sum(gradient) / l2_leaf_reg and overshoots below 0; the member's default
    leaf estimation (Gradient) keeps every prediction inside the range the stack's guard allows."""
    rng = np.random.default_rng(3)
    X = pd.DataFrame(rng.normal(size=(1500, 8)), columns=[f"x{i}" for i in range(8)])
    zero = (X.x0 > 0.5) & (rng.random(1500) < 0.95)
    y = np.where(zero, 0.0, 6 + X.x1 + rng.normal(size=1500))
    tr, va = slice(0, 1200), slice(1200, None)
    member = CatBoostMember({"thread_count": 1}, [], seed=0).fit(X[tr], y[tr], X[va], y[va])
    lo, hi = label_bounds(y[tr], GuardConfig().label_margin)
    pred = member.predict(X)
    assert pred.min() >= lo and pred.max() <= hi
