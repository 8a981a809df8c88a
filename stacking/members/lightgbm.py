"""LightGBM member: categorical codes, Huber objective, early stopping on the fold's validation part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from popstack.datamodules.typed import setting
from popstack.stacking.members.base import (
    MemberParams,
    as_params,
    auto_or_int,
    auto_or_positive,
    fit_params,
    register_member,
)


@dataclass
class LightGBMParams(MemberParams):
    """LightGBM's training parameters (the names are LightGBM's).

    objective: huber | regression (l2) | regression_l1 | ...; alpha: the Huber delta.
    learning_rate: a number, or auto (``members.base.auto_learning_rate``: scaled to the fold's training rows).
    num_leaves, min_data_in_leaf, feature_fraction, max_bin: tree shape, feature subsampling, histogram bins.
    n_estimators: a cap: early stopping on the fold's validation part ends the fit.
    early_stopping_rounds: rounds without a better validation score before the fit stops.
    num_threads: auto (one thread per 20k training rows, at most the fit's share of the cores) or an integer.
    """

    objective: str = setting("huber")
    alpha: float = setting(1.0, lo=0, lo_open=True)
    learning_rate: float | str = setting("auto", check=auto_or_positive)
    num_leaves: int = setting(31, lo=2)
    min_data_in_leaf: int = setting(20, lo=1)
    feature_fraction: float = setting(0.5, lo=0, hi=1, lo_open=True)
    max_bin: int = setting(63, lo=2)
    n_estimators: int = setting(3000, lo=1)
    early_stopping_rounds: int = setting(50, lo=1)
    num_threads: int | str = setting("auto", check=auto_or_int)


@register_member("lightgbm")
class LightGBMMember:
    """LightGBM regressor; categorical codes (columns with at most ``max_cat_levels`` levels; wider ones,
    e.g. user ids, stay numeric); objective huber/l2/l1; early stopping on the fold's validation part."""

    Params = LightGBMParams
    extension = "txt"
    thread_key, round_key, lr_key, uses_torch = "num_threads", "n_estimators", "learning_rate", False
    #: Categorical columns with more levels than this stay numeric (one split per level would overfit user ids).
    max_cat_levels = 1000

    def __init__(self, params: LightGBMParams | dict[str, Any], categorical: list[str], seed: int):
        self.params = as_params(LightGBMParams, params, self.name)
        self.categorical, self.seed = list(categorical), seed
        self.booster = None
        self.columns: list[str] = []

    def fit(self, X_tr, y_tr, X_va, y_va):
        import lightgbm as lgb

        self.columns = list(X_tr.columns)
        cats = [c for c in self.categorical if c in self.columns and X_tr[c].nunique() <= self.max_cat_levels]
        p = fit_params(self.params.library_params("n_estimators", "early_stopping_rounds"), len(X_tr),
                       "learning_rate", "num_threads")
        p.update(seed=self.seed, deterministic=True, verbosity=-1, force_col_wise=True)
        rounds = int(self.params.n_estimators)
        train = lgb.Dataset(X_tr, y_tr, categorical_feature=cats, free_raw_data=False)
        if X_va is None:  # a refit on every label: a fixed number of trees (``refit_params``)
            self.booster = lgb.train(p, train, num_boost_round=rounds)
            return self
        valid = lgb.Dataset(X_va, y_va, categorical_feature=cats, reference=train)
        self.booster = lgb.train(p, train, num_boost_round=rounds, valid_sets=[valid],
                                 callbacks=[lgb.early_stopping(int(self.params.early_stopping_rounds), verbose=False)])
        return self

    def best_rounds(self) -> int:
        """Trees up to the best validation score (all of them for a fit without a validation part)."""
        return int(self.booster.best_iteration or self.booster.current_iteration())

    def predict(self, X):
        return self.booster.predict(X[self.columns], num_iteration=self.booster.best_iteration).astype(np.float64)

    def save(self, path):
        self.booster.save_model(str(path), num_iteration=self.booster.best_iteration)

    @classmethod
    def load(cls, path):
        import lightgbm as lgb

        member = cls(LightGBMParams(), [], 0)
        member.booster = lgb.Booster(model_file=str(path))
        member.columns = member.booster.feature_name()
        return member

    def feature_importance(self):
        return pd.Series(self.booster.feature_importance("gain"), index=self.columns)
