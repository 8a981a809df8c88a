"""XGBoost member: histogram trees, pseudo-Huber loss from the training median, native categorical splits,
early stopping on the fold's validation part, the model saved in XGBoost's JSON format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from popstack.datamodules.typed import setting
from popstack.stacking.members.base import (
    MemberParams,
    as_params,
    auto_learning_rate,
    auto_or_int,
    auto_or_positive,
    cores_per_fit,
    register_member,
    threads_for,
)


def _codes(column: pd.Series) -> pd.Series:
    """A categorical column's codes as nullable integers (the feature table stores them as floats)."""
    return column.astype("Float64").round().astype("Int64")


@dataclass
class XGBoostParams(MemberParams):
    """XGBoost's training parameters (the names are XGBoost's).

    enabled: opt-in: on the demo it moved the held-back score within noise at twice the stack's time
        (``benchmarks/README.md``, XGBoost member).
    objective: reg:pseudohubererror (huber_slope: its delta) | reg:squarederror | reg:absoluteerror | ...
    learning_rate: a number, or auto (``members.base.auto_learning_rate``: scaled to the fold's training rows).
    max_depth, subsample, colsample_bytree, reg_lambda: tree depth, row and column subsampling, L2 leaf
        regularisation.
    min_child_weight: the least hessian sum in a leaf; a row's pseudo-Huber hessian is at most 1, so 20 keeps at
        least 20 rows per leaf (LightGBM's min_data_in_leaf; XGBoost's own default 1 overfits small folds,
        benchmarks/README.md).
    max_bin: histogram bins per feature (tree_method hist).
    max_cat_levels: categorical columns with at most this many levels split natively; wider ones (user ids) stay
        numeric codes.
    n_estimators: a cap: early stopping on the fold's validation part ends the fit.
    early_stopping_rounds: rounds without a better validation score before the fit stops (eval_metric).
    nthread: auto (one thread per 20k training rows, at most the fit's share of the cores) or an integer.
    device: cpu | cuda | cuda:<n> (XGBoost's GPU trainer).
    """

    enabled: bool = setting(False)
    objective: str = setting("reg:pseudohubererror")
    huber_slope: float = setting(1.0, lo=0, lo_open=True)
    learning_rate: float | str = setting("auto", check=auto_or_positive)
    max_depth: int = setting(6, lo=1)
    min_child_weight: float = setting(20.0, lo=0)
    subsample: float = setting(1.0, lo=0, hi=1, lo_open=True)
    colsample_bytree: float = setting(0.5, lo=0, hi=1, lo_open=True)
    reg_lambda: float = setting(1.0, lo=0)
    max_bin: int = setting(63, lo=2)
    max_cat_levels: int = setting(1000, lo=1)
    n_estimators: int = setting(3000, lo=1)
    early_stopping_rounds: int = setting(50, lo=1)
    eval_metric: str = setting("mae")
    nthread: int | str = setting("auto", check=auto_or_int)
    device: str = setting("cpu")


@register_member("xgboost")
class XGBoostMember:
    """XGBoost regressor on ``y - offset`` (offset = the training median: the pseudo-Huber gradient is clipped, so
    trees starting from 0 would spend their steps walking to the label level). Columns are passed by position (a
    feature name with ``[``, ``]`` or ``<`` is refused by XGBoost); categorical columns become pandas categories
    with the training levels as integer codes (an unseen level is missing)."""

    Params = XGBoostParams
    extension = "json"
    thread_key, round_key, lr_key, uses_torch = "nthread", "n_estimators", "learning_rate", False

    def __init__(self, params: XGBoostParams | dict[str, Any], categorical: list[str], seed: int):
        self.params = as_params(XGBoostParams, params, self.name)
        self.categorical, self.seed = list(categorical), seed
        self.booster = None
        self.columns: list[str] = []
        self.levels: dict[str, list[int]] = {}  # categorical column -> its training levels (integer codes)
        self.offset = 0.0
        self.rounds = 0

    def _matrix(self, X: pd.DataFrame, y: np.ndarray | None = None):
        import xgboost as xgb

        X = X[self.columns].copy()
        for c, levels in self.levels.items():  # integer codes (XGBoost refuses float categories); NaN: missing
            X[c] = pd.Categorical(_codes(X[c]), categories=levels)
        X.columns = [f"c{i}" for i in range(len(self.columns))]
        label = None if y is None else np.asarray(y, dtype=np.float64) - self.offset
        return xgb.DMatrix(X, label=label, enable_categorical=True, missing=np.nan)

    def _train_params(self, n_rows: int) -> dict[str, Any]:
        p = self.params.library_params("max_cat_levels", "n_estimators", "early_stopping_rounds", "learning_rate",
                                       "nthread")
        lr = self.params.learning_rate
        threads = self.params.nthread
        p.update(learning_rate=auto_learning_rate(n_rows) if str(lr).lower() == "auto" else float(lr),
                 nthread=threads_for(n_rows, cores_per_fit()) if str(threads).lower() == "auto" else int(threads),
                 seed=self.seed, tree_method="hist", verbosity=0)
        return p

    def fit(self, X_tr, y_tr, X_va, y_va):
        import xgboost as xgb

        self.columns = list(X_tr.columns)
        self.levels = {c: sorted(_codes(X_tr[c]).dropna().unique().tolist()) for c in self.categorical
                       if c in self.columns and X_tr[c].nunique() <= self.params.max_cat_levels}
        self.offset = float(np.median(y_tr))
        train = self._matrix(X_tr, y_tr)
        p = self._train_params(len(X_tr))
        if X_va is None:  # a refit on every label: a fixed number of trees (``refit_params``)
            self.booster = xgb.train(p, train, num_boost_round=int(self.params.n_estimators))
            self.rounds = int(self.booster.num_boosted_rounds())
            return self
        self.booster = xgb.train(p, train, num_boost_round=int(self.params.n_estimators),
                                 evals=[(self._matrix(X_va, y_va), "valid")],
                                 early_stopping_rounds=int(self.params.early_stopping_rounds), verbose_eval=False)
        self.rounds = int(self.booster.best_iteration) + 1
        return self

    def best_rounds(self) -> int:
        """Trees up to the best validation score (all of them for a fit without a validation part)."""
        return self.rounds

    def predict(self, X):
        pred = self.booster.predict(self._matrix(X), iteration_range=(0, self.rounds))
        return pred.astype(np.float64) + self.offset

    def save(self, path):
        """The trees up to the best round in XGBoost's JSON format at ``path``; columns, categorical levels and
        offset in ``path.meta.json``."""
        self.booster[: self.rounds].save_model(str(path))
        Path(f"{path}.meta.json").write_text(json.dumps({"columns": self.columns, "levels": self.levels,
                                                         "offset": self.offset, "categorical": self.categorical}))

    @classmethod
    def load(cls, path):
        import xgboost as xgb

        meta = json.loads(Path(f"{path}.meta.json").read_text())
        member = cls(XGBoostParams(), meta["categorical"], 0)
        member.booster = xgb.Booster()
        member.booster.load_model(str(path))
        member.columns, member.levels, member.offset = meta["columns"], meta["levels"], float(meta["offset"])
        member.rounds = int(member.booster.num_boosted_rounds())
        return member

    def feature_importance(self):
        gain = self.booster.get_score(importance_type="total_gain")
        return pd.Series([float(gain[f"c{i}"]) if f"c{i}" in gain else 0.0 for i in range(len(self.columns))],
                         index=self.columns)
