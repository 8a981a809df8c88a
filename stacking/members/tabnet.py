"""TabNet member: imputed and standardised inputs, Huber loss from the training median, safetensors weights."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from popstack.datamodules.typed import setting
from popstack.stacking.members.base import (
    STDOUT_REDIRECT,
    MemberParams,
    MemberResourceError,
    as_params,
    register_member,
)


@dataclass
class TabNetParams(MemberParams):
    """TabNet's parameters (pytorch-tabnet's names).

    enabled: opt-in (experiment=hyperfusion turns it on; benchmarks/README.md, stack levers).
    n_d, n_a, n_steps: widths of the decision and attention layers, decision steps.
    max_epochs, patience: an epoch cap and early stopping on the fold's validation MAE.
    batch_size, virtual_batch_size: rows per batch (at most the fold's rows) and per ghost batch norm.
    lr: Adam's learning rate. huber_delta: the Huber loss's delta.
    """

    enabled: bool = setting(False)
    n_d: int = setting(16, lo=1)
    n_a: int = setting(16, lo=1)
    n_steps: int = setting(3, lo=1)
    max_epochs: int = setting(50, lo=1)
    patience: int = setting(5, lo=1)
    batch_size: int = setting(1024, lo=1)
    virtual_batch_size: int = setting(128, lo=1)
    lr: float = setting(0.02, lo=0, lo_open=True)
    huber_delta: float = setting(1.0, lo=0, lo_open=True)


def _device_name() -> str:
    import torch

    return "cpu" if not torch.cuda.is_available() else "auto"


@register_member("tabnet")
class TabNetMember:
    """TabNet regressor on imputed (training medians) and standardised float32 inputs; Huber loss on
    ``y - offset`` (offset = training median; like CatBoost's Huber, TabNet would otherwise start from 0)."""

    Params = TabNetParams
    extension = "safetensors"
    thread_key, round_key, lr_key, uses_torch = None, None, None, True

    def __init__(self, params: TabNetParams | dict[str, Any], categorical: list[str], seed: int):
        self.params = as_params(TabNetParams, params, self.name)
        self.seed = seed
        self.model = None
        self.scaler = None
        self.offset = 0.0

    def fit(self, X_tr, y_tr, X_va, y_va):
        import torch
        from pytorch_tabnet.tab_model import TabNetRegressor

        from popstack.features.preprocess import Standardiser

        p = self.params
        init = p.library_params("max_epochs", "patience", "batch_size", "virtual_batch_size", "lr", "huber_delta")
        self.scaler = Standardiser.fit(X_tr)
        self.offset = float(np.median(y_tr))
        self.model = TabNetRegressor(seed=self.seed, verbose=0, optimizer_params={"lr": float(p.lr)},
                                     device_name=_device_name(), **init)
        bs = min(int(p.batch_size), len(X_tr))
        vbs = min(int(p.virtual_batch_size), bs)
        # TabNet prints its early-stopping summary. Redirecting stdout swaps process-wide state, so concurrent fits
        # (the stack's threads) take turns: interleaved redirects would leave sys.stdout pointing at a buffer.
        try:
            with STDOUT_REDIRECT, contextlib.redirect_stdout(io.StringIO()):
                y_fit = (np.asarray(y_tr) - self.offset).astype(np.float32).reshape(-1, 1)
                self.model.fit(self.scaler.transform(X_tr), y_fit,
                               eval_set=[(self.scaler.transform(X_va),
                                          (np.asarray(y_va) - self.offset).astype(np.float32).reshape(-1, 1))],
                               eval_metric=["mae"], loss_fn=torch.nn.HuberLoss(delta=float(p.huber_delta)),
                               batch_size=bs, virtual_batch_size=vbs, drop_last=len(X_tr) > bs,
                               max_epochs=int(p.max_epochs), patience=int(p.patience))
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
        from pytorch_tabnet.tab_model import TabNetRegressor
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from popstack.features.preprocess import Standardiser

        meta = json.loads(Path(f"{path}.json").read_text())
        member = cls(TabNetParams(), [], 0)
        member.model = TabNetRegressor(**{**meta["init_params"], "device_name": _device_name()})
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
