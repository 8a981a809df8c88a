"""Data sources: where the posts come from, one file per ``data.kind`` (like a timm model: a file, registered).

    source = get_source(cfg.data.kind)          # the registered DataSource of that kind
    where = source.locate(cfg.data)             # the data root (or file) of a training run
    posts = source.read(cfg.data, where)        # the posts table (``datamodules.schema`` columns), checked

A source is one module in this package defining ``SOURCE``, an instance of a ``DataSource`` subclass: its ``kind``
(the value of ``data.kind`` and the name of its config section ``data.<kind>``), its typed config ``Config`` (a
dataclass of ``datamodules.typed.setting`` fields; the ``data`` group's schema gets one section per source) and
five small methods: ``locate`` (where a training run's posts are), ``check`` (a cheap look before anything is
hashed), ``read_table`` (the posts table; ``read`` checks it), ``image_root`` (images are at
``image_root(where) / image_relpath``) and ``inputs`` (what is fingerprinted as the run's outside input).
``write_example`` writes posts in the source's own form, for the contract tests (``tests/test_source_contract.py``
runs over every registered source). The modules of this package are discovered (``pkgutil``): adding a source is
adding its file and its ``configs/data/<kind>.yaml``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from popstack.datamodules.schema import (
    COLUMNS,
    EXTRA_NUMERIC,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    KEY,
    SPLITS,
    extra_columns,
)


class DataSourceError(ValueError):
    """The user's data does not fit its source (a missing file, column or value); the message names the file,
    the row and the column."""


@dataclass
class NoConfig:
    """The config section of a source without settings of its own."""


class DataSource:
    """One kind of data; subclasses set ``kind`` and ``Config`` and implement ``read`` (see the module docstring).

    ``data`` is the composed ``data`` config section (attribute access); its ``data.<kind>`` section is typed by
    ``Config``. ``where`` is what ``locate`` returned (training) or the path a user gives ``predict.py`` (new
    posts); ``new_posts`` says in words what that path must be.
    """

    kind: str = ""
    Config: type = NoConfig
    #: What ``predict.py`` takes as new posts (in words, for help texts and errors).
    new_posts: str = "a directory"
    #: Posts-table columns the source's own form carries (the others are filled as the SMPD reader fills a
    #: missing value); the contract tests compare these.
    carries: tuple[str, ...] = COLUMNS

    def locate(self, data: Any) -> Path:
        """Where a training run's posts are: ``data.root`` (a directory), resolved."""
        root = Path(str(data.root)).expanduser().resolve()
        if not root.is_dir():
            raise DataSourceError(f"data.root {root} is not a directory")
        return root

    def check(self, data: Any) -> None:
        """A cheap look at the data before it is fingerprinted (a mistyped root fails at once)."""
        self.locate(data)

    def read(self, data: Any, where: Path, *, labels: bool = True) -> pd.DataFrame:
        """The posts table of ``where`` (``labels=False``: new posts, every label NaN), checked (``check_posts``);
        ``attrs["repairs"]``: {column: repaired cells}."""
        return check_posts(self.read_table(data, Path(where), labels=labels), where)

    def read_table(self, data: Any, where: Path, *, labels: bool) -> pd.DataFrame:
        """``read`` without the check: what a source implements."""
        raise NotImplementedError

    def image_root(self, where: Path) -> Path:
        """The folder the posts' ``image_relpath`` values are relative to."""
        return Path(where)

    def inputs(self, data: Any, where: Path) -> tuple[Path, tuple[str, ...] | None]:
        """What a run reads from outside: a folder and the files below it (relative names) that are fingerprinted;
        None = every file below the folder."""
        return Path(where), None

    def write_example(self, posts: pd.DataFrame, raw: Path, directory: Path) -> list[str]:
        """Write ``posts`` (read from the SMPD directory ``raw``) in this source's form below ``directory``; the
        config overrides that read it back (contract tests)."""
        raise NotImplementedError


def _discover() -> dict[str, DataSource]:
    found: dict[str, DataSource] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        source = getattr(module, "SOURCE", None)
        if not isinstance(source, DataSource):
            raise TypeError(f"{module.__name__}: a data source module defines SOURCE, a DataSource instance")
        if source.kind != info.name or source.kind in found:
            raise TypeError(f"{module.__name__}: SOURCE.kind must be the file's name ({info.name!r}), once")
        found[source.kind] = source
    return found


_SOURCES: dict[str, DataSource] | None = None


def sources() -> dict[str, DataSource]:
    """``data.kind`` -> its source, for every module of this package (discovered once)."""
    global _SOURCES
    if _SOURCES is None:
        _SOURCES = _discover()
    return dict(_SOURCES)


def get_source(kind: str) -> DataSource:
    known = sources()
    if kind not in known:
        raise DataSourceError(f"data.kind={kind} is not a data source; known: {', '.join(known)}")
    return known[kind]


def postdate_range(data: Any) -> tuple[int, int]:
    """``data.postdate_range`` as epoch seconds [lo, hi) (a run saved before the key existed: SMPD's window)."""
    from popstack.datamodules.smpd import POSTDATE_RANGE, postdate_window

    dates = data["postdate_range"] if "postdate_range" in data else None
    return POSTDATE_RANGE if dates is None else postdate_window(list(dates))


def check_posts(posts: pd.DataFrame, where: Path) -> pd.DataFrame:
    """``posts`` when it is a posts table (``datamodules.schema``): its columns in order (then only extra columns,
    the numeric ones float64), integer and float columns typed, splits known, ``post_id`` unique;
    ``attrs["repairs"]`` present. Raises ``DataSourceError``."""
    extra = extra_columns(posts.columns)
    if tuple(c for c in posts.columns if c not in extra) != COLUMNS or list(posts.columns[len(COLUMNS):]) != extra:
        missing = [c for c in COLUMNS if c not in posts.columns]
        raise DataSourceError(f"{where}: the source's posts table lacks {missing or 'the schema order'}")
    for col in INT_COLUMNS:
        if posts[col].dtype != np.int64:
            raise DataSourceError(f"{where}: posts column {col!r} is {posts[col].dtype}, expected int64")
    for col in (*FLOAT_COLUMNS, *(c for c in extra if c.startswith(EXTRA_NUMERIC))):
        if posts[col].dtype != np.float64:
            raise DataSourceError(f"{where}: posts column {col!r} is {posts[col].dtype}, expected float64")
    bad = ~posts["split"].isin(SPLITS)
    if bad.any():
        raise DataSourceError(f"{where}: split {posts['split'][bad].iloc[0]!r} is not one of {', '.join(SPLITS)}")
    dup = posts[KEY].duplicated(keep=False)
    if dup.any():
        raise DataSourceError(f"{where}: duplicate post_id {posts[KEY][dup].iloc[0]!r}")
    if "repairs" not in posts.attrs:
        posts.attrs["repairs"] = {}
    return posts
