"""CatBoost member: categorical columns native, Huber loss from the training median, GPU when it sees one."""

from __future__ import annotations

import functools
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from popstack.datamodules.typed import setting
from popstack.stacking.members.base import (
    MemberParams,
    MemberResourceError,
    as_params,
    auto_or_int,
    auto_or_positive,
    fit_params,
    register_member,
)

log = logging.getLogger("popstack")

#: CatBoost parameters its GPU trainer rejects for regression (feature subsampling per split is CPU-only there).
CATBOOST_CPU_ONLY = ("rsm",)
#: CatBoost parameters only its GPU trainer takes (``devices``, ``gpu_ram_part``) and the member's own GPU keys.
CATBOOST_GPU_ONLY = ("devices", "gpu_ram_part")
CATBOOST_GPU_KEYS = ("use_gpu", "gpu_fallback")
GPU_FALLBACKS = ("cpu", "error")


@dataclass
class CatBoostParams(MemberParams):
    """CatBoost's regressor parameters (the names are CatBoost's).

    iterations: a cap: early stopping on the fold's validation part ends the fit.
    learning_rate: a number, or auto (``members.base.auto_learning_rate``: scaled to the fold's training rows).
    depth, l2_leaf_reg: tree depth and L2 leaf regularisation.
    border_count: histogram bins per feature (CatBoost's CPU default 254).
    rsm: share of features scored per split (CPU only; ignored on GPU): the wide SMPD vectors.
    loss_function, eval_metric: e.g. ``Huber:delta=1.0`` / ``RMSE``; the early-stopping metric.
    leaf_estimation_method: how a leaf's value is computed from its rows' derivatives. Gradient: their mean
    gradient (a step of at most delta per tree under Huber). CatBoost's own default, Newton, divides by the sum of
    second derivatives, which Huber sets to zero for every row further than delta from the prediction: a leaf of
    such rows (a label far from the others, e.g. a spike at zero) takes a step limited only by l2_leaf_reg, and the
    predictions leave the label range. Newton and Gradient agree for RMSE (second derivative 1 everywhere); Exact
    suits Quantile/MAE.
    early_stopping_rounds: rounds without a better validation score before the fit stops.
    thread_count: auto (one thread per 20k training rows, at most the fit's share of the cores) or an integer.
    use_gpu: auto (CatBoost's GPU trainer when it sees a GPU; GPU fits of the stack take turns), true or false.
    devices: GPU only: CatBoost's device list ("0", "0:1", "0-3"); its own default takes every GPU.
    gpu_ram_part: GPU only: share of each device's memory one fit reserves (CatBoost's default 0.95).
    gpu_fallback: a failing first GPU fit: cpu (every fold then fits on the CPU, one warning) or error.
    """

    iterations: int = setting(3000, lo=1)
    learning_rate: float | str = setting("auto", check=auto_or_positive)
    depth: int = setting(6, lo=1, hi=16)
    l2_leaf_reg: float = setting(3.0, lo=0)
    border_count: int = setting(64, lo=1)
    rsm: float = setting(0.2, lo=0, hi=1, lo_open=True)
    loss_function: str = setting("Huber:delta=1.0")
    eval_metric: str = setting("MAE")
    leaf_estimation_method: str = setting("Gradient", choices=("Gradient", "Newton", "Exact", "Simple"))
    early_stopping_rounds: int = setting(50, lo=1)
    thread_count: int | str = setting("auto", check=auto_or_int)
    use_gpu: bool | str = setting("auto", choices=("auto", True, False))
    devices: str = setting("0")
    gpu_ram_part: float = setting(0.5, lo=0, hi=1, lo_open=True)
    gpu_fallback: str = setting("cpu", choices=GPU_FALLBACKS)


class CatBoostDevice:
    """Where this process's CatBoost fits run, decided once and then the same for every fold.

    GPU fits take turns (``lock``): concurrent GPU fits in one process each grab the whole ``gpu_ram_part`` of every
    device in ``devices`` and fail. The first fit decides: if it fits on the GPU, every later fit does (a later GPU
    failure raises ``MemberResourceError``: falling back then would mix GPU and CPU folds); if it fails, the
    ``gpu_fallback`` setting either raises (``error``) or moves every fit of the process to the CPU (``cpu``) with one
    warning line. ``reset()`` forgets the decision (tests; a new process starts undecided).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.decided: str | None = None  # None, "GPU" or "CPU"

    def reset(self) -> None:
        with self.lock:
            self.decided = None


CATBOOST_DEVICE = CatBoostDevice()


@functools.lru_cache(maxsize=1)
def catboost_gpu_count() -> int:
    """GPUs CatBoost sees, asked once per process (each query without a driver prints a line to stderr)."""
    from catboost.utils import get_gpu_device_count

    return get_gpu_device_count()


def _int_categoricals(X: pd.DataFrame, categorical: list[str]) -> pd.DataFrame:
    """CatBoost needs integer (or string) categorical columns: codes as int64, NaN -> -1."""
    X = X.copy()
    for c in categorical:
        X[c] = X[c].fillna(-1).astype(np.int64)
    return X


@register_member("catboost")
class CatBoostMember:
    """CatBoost regressor; categorical columns native; loss ``Huber:delta=d`` or ``RMSE``; GPU when asked.

    CatBoost's Huber loss cannot start from the label average (``boost_from_average`` is refused), so the member
    fits ``y - offset`` with offset = the training median and adds it back: otherwise every tree spends its
    clipped gradient walking from 0 to ~6.4.
    """

    Params = CatBoostParams
    extension = "cbm"
    thread_key, round_key, lr_key, uses_torch = "thread_count", "iterations", "learning_rate", False

    def __init__(self, params: CatBoostParams | dict[str, Any], categorical: list[str], seed: int):
        self.params = as_params(CatBoostParams, params, self.name)
        self.categorical, self.seed = list(categorical), seed
        self.model = None
        self.columns: list[str] = []
        self.offset = 0.0

    def _model(self, n_rows: int, gpu: bool, refit: bool = False):
        from catboost import CatBoostRegressor

        own = (*CATBOOST_GPU_KEYS, *(("early_stopping_rounds",) if refit else ()))
        p = fit_params(self.params.library_params(*own), n_rows, "learning_rate", "thread_count")
        drop = CATBOOST_CPU_ONLY if gpu else CATBOOST_GPU_ONLY
        p = {k: v for k, v in p.items() if k not in drop}
        return CatBoostRegressor(random_seed=self.seed, task_type="GPU" if gpu else "CPU", verbose=False,
                                 allow_writing_files=False, **p)

    def _use_gpu(self) -> bool:
        """``use_gpu``: true, false or auto (a GPU when CatBoost sees one)."""
        if str(self.params.use_gpu).lower() in ("false", "0", "no"):
            return False
        return catboost_gpu_count() > 0

    def fit(self, X_tr, y_tr, X_va, y_va):
        self.columns = list(X_tr.columns)
        cats = [c for c in self.categorical if c in self.columns]
        self.offset = float(np.median(y_tr))
        args = (_int_categoricals(X_tr, cats), np.asarray(y_tr) - self.offset)
        kwargs: dict[str, Any] = dict(cat_features=cats)
        refit = X_va is None  # a refit on every label: a fixed number of trees, no early stopping (``refit_params``)
        if not refit:
            kwargs.update(eval_set=(_int_categoricals(X_va, cats), np.asarray(y_va) - self.offset),
                          use_best_model=True)
        if self._use_gpu():
            self._fit_gpu_or_fall_back(args, kwargs, refit)
        else:
            self.model = self._model(len(X_tr), False, refit)
            self.model.fit(*args, **kwargs)
        return self

    def best_rounds(self) -> int:
        """Trees up to the best validation score (all of them for a fit without a validation part)."""
        best = self.model.get_best_iteration()
        return int(best) + 1 if best is not None else int(self.model.tree_count_)

    def _fit_gpu_or_fall_back(self, args: tuple, kwargs: dict, refit: bool) -> None:
        """One GPU fit at a time; the first decides GPU or CPU for every fit (``CatBoostDevice``)."""
        from catboost import CatBoostError

        fallback = self.params.gpu_fallback
        if fallback not in GPU_FALLBACKS:
            raise ValueError(f"stacking.members.catboost.gpu_fallback must be one of {list(GPU_FALLBACKS)}, "
                             f"got {fallback!r}")
        dev = CATBOOST_DEVICE
        with dev.lock:
            if dev.decided != "CPU":
                try:
                    self.model = self._model(len(args[0]), True, refit)
                    self.model.fit(*args, **kwargs)
                    dev.decided = "GPU"
                    return
                except CatBoostError as err:  # e.g. out of GPU memory, or a loss its GPU trainer lacks
                    reason = " ".join(str(err).split())
                    if dev.decided == "GPU":
                        raise MemberResourceError(
                            f"catboost: a GPU fit failed after earlier fits of this run ran on the GPU ({reason}); "
                            f"set stacking.members.catboost.use_gpu=false (or a smaller gpu_ram_part / fewer "
                            f"devices) so every fold fits on one kind of device") from err
                    if fallback == "error":
                        raise MemberResourceError(
                            f"catboost: GPU fit failed ({reason}); set stacking.members.catboost.use_gpu=false, or "
                            f"gpu_fallback=cpu to fit every fold on the CPU instead") from err
                    dev.decided = "CPU"
                    log.warning("catboost: GPU fit failed (%s); every CatBoost fit of this process runs on the CPU",
                                reason)
        self.model = self._model(len(args[0]), False, refit)
        self.model.fit(*args, **kwargs)

    def predict(self, X):
        cats = [c for c in self.categorical if c in self.columns]
        return self.model.predict(_int_categoricals(X[self.columns], cats)).astype(np.float64) + self.offset

    def save(self, path):
        self.model.save_model(str(path), format="cbm")
        Path(f"{path}.json").write_text(json.dumps({"columns": self.columns, "categorical": self.categorical,
                                                    "offset": self.offset}))

    @classmethod
    def load(cls, path):
        from catboost import CatBoostRegressor

        meta = json.loads(Path(f"{path}.json").read_text())
        member = cls(CatBoostParams(), meta["categorical"], 0)
        member.model = CatBoostRegressor()
        member.model.load_model(str(path), format="cbm")
        member.columns = meta["columns"]
        member.offset = float(meta["offset"])
        return member

    def feature_importance(self):
        return pd.Series(self.model.get_feature_importance(), index=self.columns)
