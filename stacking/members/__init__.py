"""Stacking members behind one small interface: fit on a fold (early stopping on its validation part),
predict, save/load in the library's native format (no pickle), feature importance.

    member = make_member("lightgbm", LightGBMParams(), categorical, seed)   # or a {key: value} dict of params
    member.fit(X_tr, y_tr, X_va, y_va); member.predict(X); member.save(path); load_member("lightgbm", path)

A tabular member is one module of this package (``catboost.py``, ``lightgbm.py``, ``tabnet.py``, ...): a class
registered with ``@register_member("name")`` and its typed params dataclass beside it (``base.Member`` says what the
class has). Importing this package imports every module in it, so a new file is a new member: the registry
(``MEMBERS``), the ``stacking.members`` config section (``stacking.config``) and the contract tests
(tests/test_member_contract.py) pick it up. ``neural.NeuralMember`` reads a neural module's prediction column; the
stack makes one per column, so it is not registered.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from typing import Any

from popstack.datamodules.cores import available_cores
from popstack.stacking.members.base import (
    MEMBERS,
    Member,
    MemberParams,
    MemberResourceError,
    as_params,
    auto_learning_rate,
    cores_per_fit,
    fit_cores,
    fit_params,
    label_bounds,
    register_member,
    threads_for,
)
from popstack.stacking.members.neural import NeuralMember

for _module in pkgutil.iter_modules(__path__):  # every member file registers itself on import
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "MEMBERS", "Member", "MemberParams", "MemberResourceError", "NeuralMember", "auto_learning_rate",
    "available_cores", "cores_per_fit", "fit_cores", "fit_params", "fit_threads", "label_bounds", "load_member",
    "make_member", "member_class", "member_params", "refit_params", "register_member", "threads_for",
]


def member_class(kind: str) -> type:
    """The registered member class ``kind``; ``ValueError`` naming the registered ones otherwise."""
    if kind not in MEMBERS:
        raise ValueError(f"unknown member {kind!r}; members are {sorted(MEMBERS)} or neural columns")
    return MEMBERS[kind]


def member_params(kind: str, params: MemberParams | dict[str, Any]) -> MemberParams:
    """``params`` as member ``kind``'s params dataclass (a dict: its keys over the dataclass's defaults)."""
    return as_params(member_class(kind).Params, params, kind)


def make_member(kind: str, params: MemberParams | dict[str, Any], categorical: list[str], seed: int):
    """A new, unfitted member ``kind`` with ``params`` (its params dataclass, or a dict of some of its keys)."""
    return member_class(kind)(params, categorical, seed)


def load_member(kind: str, path: Path):
    """A saved member: ``kind`` is a registered name, or ``neural`` for a prediction column."""
    return NeuralMember.load(path) if kind == "neural" else member_class(kind).load(path)


def fit_threads(kind: str, params: MemberParams | dict[str, Any], n_rows: int, cores: int) -> int:
    """Threads one fit of member ``kind`` uses on ``n_rows`` rows with ``cores`` cores: its explicit thread count
    when it sets one (<= 0: the library's default, every core), else the ``auto`` rule (also for a member whose
    threads are PyTorch's, which the stack sets)."""
    key = member_class(kind).thread_key
    value = "auto" if key is None else getattr(member_params(kind, params), key)
    if str(value).lower() == "auto":
        return threads_for(n_rows, cores)
    return int(value) if int(value) > 0 else cores


def refit_params(kind: str, params: MemberParams | dict[str, Any], rounds: int, fold_rows: int) -> MemberParams:
    """Params of a refit of tree member ``kind`` on every label (AutoGluon's ``refit_full``): ``rounds`` trees (the
    member fits without early stopping when it has no validation part), and the learning rate the fold fits used
    (``auto`` resolved for ``fold_rows`` training rows, so the round count found by early stopping means the same
    step size). ``ValueError`` for a member the stack does not refit (``round_key`` None)."""
    cls = member_class(kind)
    if cls.round_key is None:
        raise ValueError(f"member {kind!r} is not refitted on every label (it keeps its fold models)")
    params = member_params(kind, params)
    change: dict[str, Any] = {cls.round_key: int(rounds)}
    if str(getattr(params, cls.lr_key)).lower() == "auto":
        change[cls.lr_key] = auto_learning_rate(fold_rows)
    return dataclasses.replace(params, **change)
