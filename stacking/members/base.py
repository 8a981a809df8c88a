"""What every tabular member shares: the interface, the registry, the typed params base, and the fit helpers
(``learning_rate: auto``, ``auto`` threads, the cores one fit may use).

A member is one module of this package: a class registered with ``@register_member("name")`` holding its typed
params dataclass (``Params``, a subclass of ``MemberParams``) beside it. ``popstack.stacking.members`` imports every
module of the package, so the registry (``MEMBERS``) and the ``stacking.members`` config section (one entry per
registered member) grow by that file alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd

from popstack.datamodules.cores import available_cores
from popstack.datamodules.typed import setting

#: Held while a fit redirects the process's stdout (TabNet), so fits on several threads never interleave redirects.
STDOUT_REDIRECT = threading.Lock()


class MemberResourceError(RuntimeError):
    """A member cannot fit with the resources it was given (a GPU that fails, CUDA out of memory): the message
    says which setting to change. The entry points print it as one ``error:`` line."""


def _plain_extra(value: Any) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return None if ok else "a mapping of the library's parameter names to values"


@dataclass
class MemberParams:
    """Keys every member has.

    enabled: the stack fits this member.
    extra: further parameters handed to the library as they are (``{bagging_fraction: 0.8}``), for the library
        options the member's params do not name; a key the member's params name is refused (set it directly).
    """

    enabled: bool = setting(True)
    extra: dict[str, Any] = setting({}, check=_plain_extra)

    def __post_init__(self):
        error = self.config_error({"extra": self.extra})
        if error:
            raise ValueError(error)

    @classmethod
    def config_error(cls, values: dict[str, Any]) -> str | None:
        """The rule across keys (``pipeline.schema`` asks it after each key's own rule): ``extra`` names no key
        of the params."""
        named = sorted(set(values["extra"]) & {f.name for f in fields(cls)})
        if named:
            return f"extra.{named[0]} is a parameter of its own: set it directly, not under extra"
        return None

    def library_params(self, *own: str) -> dict[str, Any]:
        """The library's keyword arguments: every field except ``enabled``, ``extra`` and the member's ``own`` keys
        (the ones it handles itself), then ``extra``."""
        skip = {"enabled", "extra", *own}
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}, **self.extra}


def as_params(params_cls: type[MemberParams], params: MemberParams | dict[str, Any], kind: str) -> MemberParams:
    """``params`` as ``params_cls`` (a dict: its keys over the dataclass's defaults; an unknown key is refused)."""
    if isinstance(params, params_cls):
        return params
    if not isinstance(params, dict):
        raise TypeError(f"member {kind!r}: params must be {params_cls.__name__} or a dict, got {type(params).__name__}")
    names = {f.name for f in fields(params_cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"member {kind!r} has no parameter {', '.join(unknown)} (its parameters: "
                         f"{', '.join(sorted(names))}; other library parameters go under extra)")
    return params_cls(**params)


def auto_or_positive(value: Any) -> str | None:
    """Rule of ``learning_rate``-like keys: ``auto`` or a number > 0."""
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        return None
    return "auto or a number > 0"


def auto_or_int(value: Any) -> str | None:
    """Rule of thread-count keys: ``auto`` or an integer (<= 0: the library's default, every core)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return None
    return "auto or an integer (<= 0: every core)"


class Member(Protocol):
    """One tabular member. ``Params``: its typed params; ``extension``: its saved file's suffix;
    ``thread_key``: its library's thread-count parameter (None: threads are PyTorch's, set by the stack);
    ``round_key``/``lr_key``: its round-count and learning-rate parameters when the stack refits it on every label
    (``refit_full``; None: it keeps its fold models), then it also has ``best_rounds()``; ``uses_torch``: it fits
    with PyTorch (the stack sets PyTorch's threads for it)."""

    name: ClassVar[str]
    extension: ClassVar[str]
    Params: ClassVar[type[MemberParams]]
    thread_key: ClassVar[str | None]
    round_key: ClassVar[str | None]
    lr_key: ClassVar[str | None]
    uses_torch: ClassVar[bool]

    def __init__(self, params: MemberParams | dict[str, Any], categorical: list[str], seed: int) -> None: ...
    def fit(self, X_tr: pd.DataFrame, y_tr: np.ndarray, X_va: pd.DataFrame | None,
            y_va: np.ndarray | None) -> "Member": ...
    def predict(self, X: pd.DataFrame) -> np.ndarray: ...
    def save(self, path: Path) -> None: ...
    @classmethod
    def load(cls, path: Path) -> "Member": ...
    def feature_importance(self) -> pd.Series | None: ...


#: Registered tabular members by config name, in the order of the package's module names.
MEMBERS: dict[str, type] = {}


def register_member(name: str):
    """Class decorator: the member is known as ``name`` (``stacking.members.<name>`` in the config)."""

    def register(cls):
        if name in MEMBERS and MEMBERS[name] is not cls:
            raise ValueError(f"member {name!r} is registered twice ({MEMBERS[name].__module__}, {cls.__module__})")
        cls.name = name
        MEMBERS[name] = cls
        return cls

    return register


def auto_learning_rate(n_rows: int) -> float:
    """Boosting step for ``learning_rate: auto``: 0.1 at 3k training rows, scaled by (3k / n) ** 0.25 and kept in
    [0.02, 0.2] (0.056 at 30k rows, 0.032 at 300k). Small folds converge in a few hundred trees instead of running
    out a schedule made for SMPD; large ones take smaller steps, which early stopping turns into more trees."""
    return float(np.clip(0.1 * (3_000 / max(n_rows, 1)) ** 0.25, 0.02, 0.2))


#: Training rows per thread of an ``auto`` thread count: below this a tree's histogram work per thread is too small
#: for OpenMP's barriers (benchmarks/README.md).
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
    if lr_key in p and str(p[lr_key]).lower() == "auto":
        p[lr_key] = auto_learning_rate(n_rows)
    if thread_key not in p or str(p[thread_key]).lower() == "auto":
        p[thread_key] = threads_for(n_rows, cores_per_fit())
    return p


def label_bounds(y: np.ndarray, margin: float) -> tuple[float, float]:
    """The range of the training labels ``y`` widened by ``margin`` times its width on each side."""
    lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
    return lo - margin * (hi - lo), hi + margin * (hi - lo)
