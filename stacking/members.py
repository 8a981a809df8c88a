"""Stacking members behind one small interface: fit on a fold (early stopping on its validation part),
predict, save/load in the library's native format (no pickle), feature importance.

    member = make_member("lightgbm", params, categorical, seed)
    member.fit(X_tr, y_tr, X_va, y_va); member.predict(X); member.save(path); type(member).load(path)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import json
import logging
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from popstack.datamodules.cores import available_cores

log = logging.getLogger("popstack")

#: Held while a fit redirects the process's stdout (TabNet), so fits on several threads never interleave redirects.
_STDOUT_REDIRECT = threading.Lock()

#: CatBoost parameters its GPU trainer rejects for regression (feature subsampling per split is CPU-only there).
CATBOOST_CPU_ONLY = ("rsm",)
#: CatBoost parameters only its GPU trainer takes (``devices``, ``gpu_ram_part``) and the member's own GPU keys.
CATBOOST_GPU_ONLY = ("devices", "gpu_ram_part")
CATBOOST_GPU_KEYS = ("use_gpu", "gpu_fallback")
GPU_FALLBACKS = ("cpu", "error")


class MemberResourceError(RuntimeError):
    """A member cannot fit with the resources it was given (a GPU that fails, CUDA out of memory): the message
    says which setting to change. The entry points print it as one ``error:`` line."""


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

class Member(Protocol):
    name: str
    extension: str

    def fit(self, X_tr: pd.DataFrame, y_tr: np.ndarray, X_va: pd.DataFrame, y_va: np.ndarray) -> "Member": ...
    def predict(self, X: pd.DataFrame) -> np.ndarray: ...
    def save(self, path: Path) -> None: ...
    def feature_importance(self) -> pd.Series | None: ...


def auto_learning_rate(n_rows: int) -> float:
    """Boosting step for ``learning_rate: auto``: 0.1 at 3k training rows, scaled by (3k / n) ** 0.25 and kept in
    [0.02, 0.2] (0.056 at 30k rows, 0.032 at 300k). Small folds converge in a few hundred trees instead of running
    out a schedule made for SMPD; large ones take smaller steps, which early stopping turns into more trees.
    (6k-post synthetic run, fold 0, CatBoost depth 6: step 0.1 -> val MAE 1.079, 0.133 -> 1.088, 0.05 -> 1.079 at
    twice the trees.)"""
    return float(np.clip(0.1 * (3_000 / max(n_rows, 1)) ** 0.25, 0.02, 0.2))


#: Training rows per thread of an ``auto`` thread count: below this a tree's histogram work per thread is too small
#: for OpenMP's barriers (1k x 50 LightGBM, 2 folds, on a loaded 2-core machine: 138 s with 2 threads, 1.6 s with 1).
ROWS_PER_THREAD = 20_000


#: Cores one fit may use; the stack sets it when it runs several fits at once (``fit_cores``).
_FIT_CORES: contextvars.ContextVar[int | None] = contextvars.ContextVar("popstack_fit_cores", default=None)


@contextlib.contextmanager
def fit_cores(cores: int):
    """Within this block (and in tasks run with a copy of its context), ``auto`` threads are capped at ``cores``."""
    token = _FIT_CORES.set(max(int(cores), 1))
    try:
        yield
    finally:
        _FIT_CORES.reset(token)


def cores_per_fit() -> int:
    """Cores one fit may use: the stack's share per concurrent fit, or every available core."""
    return _FIT_CORES.get() or available_cores()


def threads_for(n_rows: int, cores: int) -> int:
    """``auto`` threads of one fit on ``n_rows`` training rows: n_rows / ROWS_PER_THREAD within [1, cores]."""
    return int(np.clip(n_rows // ROWS_PER_THREAD, 1, max(cores, 1)))


def fit_params(params: dict[str, Any], n_rows: int, lr_key: str, thread_key: str) -> dict[str, Any]:
    """Copy of ``params`` with ``learning_rate: auto`` resolved for ``n_rows`` and ``auto`` threads set to
    ``threads_for(n_rows, cores_per_fit())``: a large fit gets its share of the cores and never more threads than
    that; a small one runs on one thread (and the stack runs several such fits at once)."""
    p = dict(params)
    if str(p.get(lr_key, "")).lower() == "auto":
        p[lr_key] = auto_learning_rate(n_rows)
    if str(p.get(thread_key, "auto")).lower() == "auto":
        p[thread_key] = threads_for(n_rows, cores_per_fit())
    return p


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


class CatBoostMember:
    """CatBoost regressor; categorical columns native; loss ``Huber:delta=d`` or ``RMSE``; GPU when asked.

    CatBoost's Huber loss cannot start from the label average (``boost_from_average`` is refused), so the member
    fits ``y - offset`` with offset = the training median and adds it back: otherwise every tree spends its
    clipped gradient walking from 0 to ~6.4.
    """

    name, extension = "catboost", "cbm"

    def __init__(self, params: dict[str, Any], categorical: list[str], seed: int):
        self.params, self.categorical, self.seed = dict(params), list(categorical), seed
        self.model = None
        self.columns: list[str] = []
        self.offset = 0.0

    def _model(self, n_rows: int, gpu: bool):
        from catboost import CatBoostRegressor

        p = fit_params(self.params, n_rows, "learning_rate", "thread_count")
        for key in CATBOOST_GPU_KEYS:
            p.pop(key, None)
        drop = CATBOOST_CPU_ONLY if gpu else CATBOOST_GPU_ONLY
        p = {k: v for k, v in p.items() if k not in drop}
        return CatBoostRegressor(random_seed=self.seed, task_type="GPU" if gpu else "CPU", verbose=False,
                                 allow_writing_files=False, **p)

    def _use_gpu(self) -> bool:
        """``use_gpu``: true, false or auto (default: a GPU when CatBoost sees one)."""
        want = str(self.params.get("use_gpu", "auto")).lower()
        if want in ("false", "0", "no"):
            return False
        return catboost_gpu_count() > 0

    def fit(self, X_tr, y_tr, X_va, y_va):
        self.columns = list(X_tr.columns)
        cats = [c for c in self.categorical if c in self.columns]
        self.offset = float(np.median(y_tr))
        args = (_int_categoricals(X_tr, cats), np.asarray(y_tr) - self.offset)
        kwargs = dict(cat_features=cats)
        if X_va is not None:  # None: a refit on every label, a fixed number of trees (``refit_params``)
            kwargs.update(eval_set=(_int_categoricals(X_va, cats), np.asarray(y_va) - self.offset),
                          use_best_model=True)
        if self._use_gpu():
            self._fit_gpu_or_fall_back(args, kwargs)
        else:
            self.model = self._model(len(X_tr), False)
            self.model.fit(*args, **kwargs)
        return self

    def best_rounds(self) -> int:
        """Trees up to the best validation score (all of them for a fit without a validation part)."""
        best = self.model.get_best_iteration()
        return int(best) + 1 if best is not None else int(self.model.tree_count_)

    def _fit_gpu_or_fall_back(self, args: tuple, kwargs: dict) -> None:
        """One GPU fit at a time; the first decides GPU or CPU for every fit (``CatBoostDevice``)."""
        from catboost import CatBoostError

        fallback = str(self.params.get("gpu_fallback", "cpu")).lower()
        if fallback not in GPU_FALLBACKS:
            raise ValueError(f"stacking.members.catboost.gpu_fallback must be one of {list(GPU_FALLBACKS)}, "
                             f"got {fallback!r}")
        dev = CATBOOST_DEVICE
        with dev.lock:
            if dev.decided != "CPU":
                try:
                    self.model = self._model(len(args[0]), True)
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
        self.model = self._model(len(args[0]), False)
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
        member = cls({}, meta["categorical"], 0)
        member.model = CatBoostRegressor()
        member.model.load_model(str(path), format="cbm")
        member.columns = meta["columns"]
        member.offset = float(meta["offset"])
        return member

    def feature_importance(self):
        return pd.Series(self.model.get_feature_importance(), index=self.columns)


class LightGBMMember:
    """LightGBM regressor; categorical codes (columns with at most ``max_cat_levels`` levels; wider ones,
    e.g. user ids, stay numeric); objective huber/l2/l1; early stopping on the fold's validation part."""

    name, extension = "lightgbm", "txt"

    def __init__(self, params: dict[str, Any], categorical: list[str], seed: int, max_cat_levels: int = 1000):
        self.params, self.categorical, self.seed = dict(params), list(categorical), seed
        self.max_cat_levels = max_cat_levels
        self.booster = None
        self.columns: list[str] = []

    def fit(self, X_tr, y_tr, X_va, y_va):
        import lightgbm as lgb

        self.columns = list(X_tr.columns)
        cats = [c for c in self.categorical if c in self.columns and X_tr[c].nunique() <= self.max_cat_levels]
        p = fit_params(self.params, len(X_tr), "learning_rate", "num_threads")
        rounds = int(p.pop("n_estimators", 1000))
        patience = int(p.pop("early_stopping_rounds", 100))
        p.update(seed=self.seed, deterministic=True, verbosity=-1, force_col_wise=True)
        train = lgb.Dataset(X_tr, y_tr, categorical_feature=cats, free_raw_data=False)
        if X_va is None:  # a refit on every label: a fixed number of trees (``refit_params``)
            self.booster = lgb.train(p, train, num_boost_round=rounds)
            return self
        valid = lgb.Dataset(X_va, y_va, categorical_feature=cats, reference=train)
        self.booster = lgb.train(p, train, num_boost_round=rounds, valid_sets=[valid],
                                 callbacks=[lgb.early_stopping(patience, verbose=False)])
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

        member = cls({}, [], 0)
        member.booster = lgb.Booster(model_file=str(path))
        member.columns = member.booster.feature_name()
        return member

    def feature_importance(self):
        return pd.Series(self.booster.feature_importance("gain"), index=self.columns)


class TabNetMember:
    """TabNet regressor on imputed (training medians) and standardised float32 inputs; Huber loss on
    ``y - offset`` (offset = training median; like CatBoost's Huber, TabNet would otherwise start from 0)."""

    name, extension = "tabnet", "safetensors"

    def __init__(self, params: dict[str, Any], categorical: list[str], seed: int):
        self.params, self.seed = dict(params), seed
        self.model = None
        self.scaler = None
        self.offset = 0.0

    def fit(self, X_tr, y_tr, X_va, y_va):
        import torch
        from pytorch_tabnet.tab_model import TabNetRegressor

        from popstack.features.preprocess import Standardiser

        p = dict(self.params)
        fit_keys = ("max_epochs", "patience", "batch_size", "virtual_batch_size")
        fit_args = {k: p.pop(k) for k in fit_keys if k in p}
        delta = float(p.pop("huber_delta", 1.0))
        lr = float(p.pop("lr", 2e-2))
        self.scaler = Standardiser.fit(X_tr)
        self.offset = float(np.median(y_tr))
        self.model = TabNetRegressor(seed=self.seed, verbose=0, optimizer_params={"lr": lr}, device_name="cpu"
                                     if not torch.cuda.is_available() else "auto", **p)
        bs = min(int(fit_args.pop("batch_size", 1024)), len(X_tr))
        vbs = min(int(fit_args.pop("virtual_batch_size", 128)), bs)
        # TabNet prints its early-stopping summary. Redirecting stdout swaps process-wide state, so concurrent fits
        # (the stack's threads) take turns: interleaved redirects would leave sys.stdout pointing at a buffer.
        try:
            with _STDOUT_REDIRECT, contextlib.redirect_stdout(io.StringIO()):
                y_fit = (np.asarray(y_tr) - self.offset).astype(np.float32).reshape(-1, 1)
                self.model.fit(self.scaler.transform(X_tr), y_fit,
                               eval_set=[(self.scaler.transform(X_va),
                                          (np.asarray(y_va) - self.offset).astype(np.float32).reshape(-1, 1))],
                               eval_metric=["mae"], loss_fn=torch.nn.HuberLoss(delta=delta), batch_size=bs,
                               virtual_batch_size=vbs, drop_last=len(X_tr) > bs, **fit_args)
        except torch.cuda.OutOfMemoryError as err:
            self.model = None
            torch.cuda.empty_cache()
            raise MemberResourceError(
                f"tabnet: CUDA out of memory fitting {len(X_tr)} rows x {X_tr.shape[1]} features at batch_size={bs} "
                f"(other fits share the GPU); lower stacking.members.tabnet.batch_size or stacking.n_jobs, or hide "
                f"the GPU (CUDA_VISIBLE_DEVICES=)") from err
        return self

    def predict(self, X):
        return self.model.predict(self.scaler.transform(X)).reshape(-1).astype(np.float64) + self.offset

    def save(self, path):
        """Weights as safetensors at ``path`` (no pickle), the constructor arguments and offset in ``path.json``."""
        from safetensors.torch import save_model

        from popstack.datamodules.atomic import atomic_path, atomic_write_json

        init = {k: v for k, v in self.model.get_params().items() if not isinstance(v, type)}
        with atomic_path(path) as tmp:
            save_model(self.model.network, str(tmp))  # tied (shared) weights are stored once
        self.scaler.save(f"{path}.scaler.npz")
        atomic_write_json(f"{path}.json", {"offset": self.offset, "init_params": init,
                                           "feature_importances": self.model.feature_importances_.tolist()})

    @classmethod
    def load(cls, path):
        """Rebuild the network from ``path.json`` and load its safetensors weights; nothing is unpickled.
        A file that is not a safetensors tensor file raises ``ValueError`` naming it."""
        import torch
        from pytorch_tabnet.tab_model import TabNetRegressor
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from popstack.features.preprocess import Standardiser

        meta = json.loads(Path(f"{path}.json").read_text())
        member = cls({}, [], 0)
        member.model = TabNetRegressor(**{**meta["init_params"], "device_name": "cpu"
                                          if not torch.cuda.is_available() else "auto"})
        member.model._set_network()
        try:
            load_model(member.model.network, str(path), device=str(member.model.device))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a TabNet weights file (safetensors): {err}") from err
        member.model.network.eval()
        member.model.feature_importances_ = np.asarray(meta["feature_importances"])
        member.scaler = Standardiser.load(f"{path}.scaler.npz")
        member.offset = float(meta["offset"])
        return member

    def feature_importance(self):
        return pd.Series(self.model.feature_importances_, index=self.scaler.columns)


def label_bounds(y: np.ndarray, margin: float) -> tuple[float, float]:
    """The range of the training labels ``y`` widened by ``margin`` times its width on each side."""
    lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
    return lo - margin * (hi - lo), hi + margin * (hi - lo)


class NeuralMember:
    """A neural model's predictions (out-of-fold for training rows, fold mean for the rest) read from a column,
    kept inside the training label range widened by ``margin`` of its width (``stacking.guard.label_margin``): a
    regressor that extrapolates (a prediction of 210 for labels near 10) cannot drag the blend with it."""

    extension = "json"

    def __init__(self, column: str, margin: float | None = None):
        self.column = column
        self.name = column
        self.margin = margin
        self.bounds: tuple[float, float] | None = None

    def fit(self, X_tr, y_tr, X_va, y_va):
        if self.column not in X_tr.columns:
            raise KeyError(f"neural member: column {self.column!r} not in the stack inputs")
        if self.margin is not None and len(y_tr):
            self.bounds = label_bounds(np.asarray(y_tr, dtype=np.float64), self.margin)
        return self

    def predict(self, X):
        raw = X[self.column].to_numpy(dtype=np.float64)
        return raw if self.bounds is None else np.clip(raw, *self.bounds)

    def save(self, path):
        Path(path).write_text(json.dumps({"column": self.column, "bounds": self.bounds}))

    @classmethod
    def load(cls, path):
        meta = json.loads(Path(path).read_text())
        member = cls(meta["column"])
        member.bounds = tuple(meta["bounds"]) if meta.get("bounds") else None  # saved before clipping: none
        return member

    def feature_importance(self):
        return None


#: The members fitted on the tabular matrix (gradient-boosted trees and TabNet), by config name.
TABULAR_MEMBERS = {"catboost": CatBoostMember, "lightgbm": LightGBMMember, "tabnet": TabNetMember}
#: Each library's thread-count parameter (TabNet's threads are PyTorch's, set by the stack).
THREAD_KEYS = {"catboost": "thread_count", "lightgbm": "num_threads"}


def fit_threads(kind: str, params: dict[str, Any], n_rows: int, cores: int) -> int:
    """Threads one fit of member ``kind`` uses on ``n_rows`` rows with ``cores`` cores: its explicit thread count
    when it sets one (<= 0: the library's default, every core), else the ``auto`` rule."""
    value = params.get(THREAD_KEYS.get(kind, ""), "auto")
    if str(value).lower() == "auto":
        return threads_for(n_rows, cores)
    return int(value) if int(value) > 0 else cores


#: Each tree library's round-count parameter: what a refit on every label sets to the scaled best count.
ROUND_KEYS = {"catboost": "iterations", "lightgbm": "n_estimators"}
#: Each tree library's learning-rate and early-stopping parameters.
LR_KEYS = {"catboost": "learning_rate", "lightgbm": "learning_rate"}
PATIENCE_KEYS = {"catboost": "early_stopping_rounds", "lightgbm": "early_stopping_rounds"}


def refit_params(kind: str, params: dict[str, Any], rounds: int, fold_rows: int) -> dict[str, Any]:
    """Params of a refit of tree member ``kind`` on every label (AutoGluon's ``refit_full``): ``rounds`` trees, no
    early stopping, and the learning rate the fold fits used (``auto`` resolved for ``fold_rows`` training rows,
    so the round count found by early stopping means the same step size)."""
    p = {k: v for k, v in params.items() if k != PATIENCE_KEYS[kind]}
    p[ROUND_KEYS[kind]] = int(rounds)
    if str(p.get(LR_KEYS[kind], "")).lower() == "auto":
        p[LR_KEYS[kind]] = auto_learning_rate(fold_rows)
    return p


def make_member(kind: str, params: dict[str, Any], categorical: list[str], seed: int):
    if kind not in TABULAR_MEMBERS:
        raise ValueError(f"unknown member {kind!r}; members are {sorted(TABULAR_MEMBERS)} or neural columns")
    return TABULAR_MEMBERS[kind](params, categorical, seed)


def load_member(kind: str, path: Path):
    return NeuralMember.load(path) if kind == "neural" else TABULAR_MEMBERS[kind].load(path)
