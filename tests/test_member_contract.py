"""The contract of every registered tabular member (``popstack.stacking.members.MEMBERS``): a new member file is
tested here without an edit. Each fits on a small frame with a categorical column (early stopping on a validation
part), predicts, saves, loads to identical predictions, reports one importance per input column, refits on every
label when the stack refits it, and its params dataclass is the composed ``stacking.members.<name>`` section."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from popstack.stacking.members import MEMBERS, MemberParams, load_member, make_member, member_params, refit_params

NAMES = list(MEMBERS)


def _frame(n: int = 320, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Five numeric columns (one with gaps) and ``cat`` (float codes, as the feature table stores them, with NaN);
    the label depends on both kinds."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 5)).astype(np.float32), columns=[f"f{i}" for i in range(5)])
    X["cat"] = rng.integers(0, 5, n).astype(np.float32)
    y = 6 + 1.5 * X.f0.to_numpy() + 0.8 * X.cat.to_numpy() + rng.normal(0, 0.3, n)
    X.loc[X.index % 17 == 0, "f4"] = np.nan
    X.loc[X.index % 23 == 0, "cat"] = np.nan
    return X, y


@pytest.mark.parametrize("name", NAMES)
def test_member_fits_predicts_saves_and_loads_identically(name, tmp_path):
    cls = MEMBERS[name]
    X, y = _frame()
    member = make_member(name, cls.Params(), ["cat"], seed=0)
    assert member.fit(X[:200], y[:200], X[200:260], y[200:260]) is member
    pred = member.predict(X)
    assert pred.shape == (len(X),) and pred.dtype == np.float64 and np.isfinite(pred).all()
    unseen = slice(260, None)  # neither fitted nor used for early stopping
    assert np.mean(np.abs(pred[unseen] - y[unseen])) < np.mean(np.abs(np.median(y[:200]) - y[unseen]))

    path = tmp_path / f"{name}.{cls.extension}"
    member.save(path)
    back = load_member(name, path)
    assert isinstance(back, cls)
    np.testing.assert_array_equal(back.predict(X), pred)
    np.testing.assert_array_equal(back.predict(X[::-1].reset_index(drop=True)), pred[::-1])  # row order kept

    for m in (member, back):
        importance = m.feature_importance()
        assert isinstance(importance, pd.Series) and list(importance.index) == list(X.columns)
        assert np.isfinite(importance.to_numpy()).all() and importance.sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_member_refits_on_every_label_when_the_stack_refits_it(name):
    """A member with ``round_key`` reports its best round count and refits without a validation part on that many
    rounds (``refit_params``); one without keeps its fold models and ``refit_params`` refuses it."""
    cls = MEMBERS[name]
    X, y = _frame()
    if cls.round_key is None:
        with pytest.raises(ValueError, match="not refitted"):
            refit_params(name, cls.Params(), 10, 200)
        return
    member = make_member(name, cls.Params(), ["cat"], seed=0).fit(X[:200], y[:200], X[200:260], y[200:260])
    rounds = member.best_rounds()
    assert 1 <= rounds <= getattr(cls.Params(), cls.round_key)
    params = refit_params(name, cls.Params(), rounds, 200)
    assert getattr(params, cls.round_key) == rounds and getattr(params, cls.lr_key) != "auto"
    full = make_member(name, params, ["cat"], seed=0).fit(X[:260], y[:260], None, None)
    assert full.best_rounds() == rounds and np.isfinite(full.predict(X)).all()


@pytest.mark.parametrize("name", NAMES)
def test_member_params_are_its_config_section(name):
    """The params dataclass (defaults written once, beside the member) is what ``stacking.members.<name>``
    composes to; the keys the stack reads by name exist; unknown keys and ``extra`` naming a key are refused."""
    from omegaconf import OmegaConf

    from popstack.pipeline.config import compose_config

    cls = MEMBERS[name]
    assert issubclass(cls.Params, MemberParams) and cls.name == name
    composed = OmegaConf.to_container(compose_config(["~experiment"]).stacking.members[name], resolve=True)
    assert composed == dataclasses.asdict(cls.Params())
    assert member_params(name, composed) == cls.Params()
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    for key in (cls.thread_key, cls.round_key, cls.lr_key):
        assert key is None or key in fields, key
    with pytest.raises(ValueError, match="no_such_key"):
        make_member(name, {"no_such_key": 1}, [], 0)
    with pytest.raises(ValueError, match="enabled"):
        make_member(name, {"extra": {"enabled": False}}, [], 0)
