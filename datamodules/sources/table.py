"""``data.kind=table``: the user's own posts from one CSV or Parquet file (``data.table.path``), one row per post.

    python train.py data=table data.table.path=/data/my_posts.csv data.table.columns.post_id=id \\
        'data.table.extra_numeric=[followers]' 'data.table.extra_categorical=[device]'

Columns are mapped in ``data.table.columns`` (posts-table field -> the file's column). ``post_id``, ``uid`` and
``postdate`` (epoch seconds or a date / date-time string, UTC when no zone is given) must be there. Every other
field is optional: null (the default) takes the file's column of the field's own name when there is one, a name
takes that column (then it must exist). ``label`` is the popularity target (e.g. log-views); a row without one is a
test post (scored, not fitted). ``split`` (``train``/``test``), when given, wins over that rule. ``image_path`` is
relative to the file's folder (confined to it like SMPD images; a path leaving it is never opened). Fields absent
from the file get the SMPD reader's values for a missing field: empty text, NaN numbers, no geotag (accuracy 0),
no user/location vectors. ``extra_numeric`` / ``extra_categorical`` name further columns handed to the features
(``extra_num__<name>`` / ``extra_cat__<name>`` in ``posts.parquet``, the ``extra`` feature family).

Errors (``DataSourceError``) name the file, the row (0-based data row; CSV: and its line) and the column: a
missing mapped column, an unparsable or out-of-window date (``data.postdate_range``), a non-numeric label or
number, an empty or duplicate ``post_id``. New posts for ``predict.py`` are a file of the same form (labels
ignored).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from popstack.datamodules.schema import (
    COLUMNS,
    EXTRA_CATEGORICAL,
    EXTRA_NUMERIC,
    IMAGE_MISSING,
    IMAGE_OUTSIDE,
    KEY,
    LABEL,
    SPLITS,
    VECTOR_COLUMNS,
)
from popstack.datamodules.sources import DataSource, DataSourceError, postdate_range
from popstack.datamodules.typed import setting

#: Required fields (the file must have them; the default column name is the field's).
REQUIRED = (KEY, "uid", "postdate")
#: Optional fields -> the posts-table column they fill (``tags`` fills ``alltags``).
OPTIONAL = {
    "label": LABEL, "split": "split", "image_path": "image_relpath", "title": "title", "tags": "alltags",
    "category": "category", "subcategory": "subcategory", "concept": "concept", "mediatype": "mediatype",
    "latitude": "latitude", "longitude": "longitude", "geoaccuracy": "geoaccuracy", "ispublic": "ispublic",
    "mediastatus": "mediastatus", "pathalias": "pathalias", "photo_firstdate": "photo_firstdate",
    "photo_firstdatetaken": "photo_firstdatetaken", "photo_count": "photo_count", "ispro": "ispro",
    "canbuypro": "canbuypro", "timezone_offset": "timezone_offset", "timezone_id": "timezone_id",
    "user_text": "user_text", "location_text": "location_text",
}
TEXT = ("title", "alltags", "category", "subcategory", "concept", "mediatype", "mediastatus")
NULLABLE_TEXT = ("pathalias", "timezone_offset", "timezone_id", "user_text", "location_text")
NUMBERS = ("latitude", "longitude", "ispublic", "photo_firstdate", "photo_firstdatetaken", "photo_count", "ispro",
           "canbuypro")
LIMITS = {"latitude": 90.0, "longitude": 180.0}
GEOACCURACY_MAX = 16
NULLS = ("", "none", "nan", "null")

#: ``data.table.columns``: field -> the file's column (required fields: their own name by default; optional ones:
#: null = the column of the field's name when the file has one).
TableColumns = make_dataclass("TableColumns", [
    *((name, str, setting(name)) for name in REQUIRED),
    *((name, str | None, setting(None)) for name in OPTIONAL),
])


def _names(values: list[str]) -> str | None:
    bad = [v for v in values if not isinstance(v, str) or not v or "__" in v]
    return None if not bad else "a list of column names (without '__')"


@dataclass
class TableConfig:
    """path: the CSV or Parquet file (``.csv``/``.tsv``/``.parquet``/``.pq``, or say so in ``format``).
    columns: field -> column mapping (see the module docstring). extra_numeric / extra_categorical: further columns
    of the file handed to the features as numbers / categories."""

    path: str = setting("")
    format: str = setting("auto", choices=("auto", "csv", "tsv", "parquet"))
    columns: TableColumns = field(default_factory=TableColumns)
    extra_numeric: list[str] = setting([], check=_names)
    extra_categorical: list[str] = setting([], check=_names)


def _null(v: Any) -> bool:
    return v is None or v is pd.NaT or (isinstance(v, float) and math.isnan(v)) or (
        isinstance(v, str) and v.strip().lower() in NULLS)


class TableSource(DataSource):
    kind = "table"
    Config = TableConfig
    new_posts = "a CSV or Parquet file with the run's columns (data.table.columns; labels are ignored)"
    carries = tuple(c for c in COLUMNS if c not in VECTOR_COLUMNS)

    # ------------------------------------------------------------------ where
    def locate(self, data: Any) -> Path:
        if not str(data.table.path):
            raise DataSourceError("data.table.path is empty: give the CSV or Parquet file of your posts "
                                  "(data=table data.table.path=FILE)")
        path = Path(str(data.table.path)).expanduser().resolve()
        if not path.is_file():
            raise DataSourceError(f"data.table.path {path} is not a file")
        return path

    def check(self, data: Any) -> None:
        """The file is there, readable as its format, and has every mapped column (its header only)."""
        path = self.locate(data)
        self._mapping(data, path, self._header(data, path))

    def image_root(self, where: Path) -> Path:
        return Path(where).parent

    def inputs(self, data: Any, where: Path) -> tuple[Path, tuple[str, ...] | None]:
        """The file and the images it names (inside its folder): never the rest of the folder."""
        posts = self.read_table(data, Path(where), labels=True)
        images = posts.loc[posts.image_status != IMAGE_OUTSIDE, "image_relpath"]
        return Path(where).parent, (Path(where).name, *sorted({p for p in images if p}))

    # ------------------------------------------------------------------ reading
    def _format(self, data: Any, path: Path) -> str:
        fmt = str(data.table.format)
        if fmt != "auto":
            return fmt
        suffix = path.suffix.lower()
        known = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
        if suffix not in known:
            raise DataSourceError(f"{path}: cannot tell CSV from Parquet by the name; set data.table.format")
        return known[suffix]

    def _header(self, data: Any, path: Path) -> list[str]:
        fmt = self._format(data, path)
        try:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                return list(pq.read_schema(path).names)
            return [str(c) for c in pd.read_csv(path, nrows=0, sep="\t" if fmt == "tsv" else ",").columns]
        except Exception as err:  # a damaged file, a folder, bad bytes
            raise DataSourceError(f"{path}: not a readable {fmt} file ({' '.join(str(err).split())[:200]})") from None

    def _frame(self, data: Any, path: Path) -> pd.DataFrame:
        fmt = self._format(data, path)
        try:
            if fmt == "parquet":
                return pd.read_parquet(path)
            # every cell as text: ids keep leading zeros, numbers are parsed (and refused) here, by name
            return pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if fmt == "tsv" else ",")
        except Exception as err:
            raise DataSourceError(f"{path}: not a readable {fmt} file ({' '.join(str(err).split())[:200]})") from None

    def _mapping(self, data: Any, path: Path, header: list[str]) -> dict[str, str]:
        """posts-table field -> the file's column, for every field the file provides; extra columns checked."""
        columns, out = data.table.columns, {}
        for name in (*REQUIRED, *OPTIONAL):
            given = columns[name]
            column = name if given is None else str(given)
            if column in header:
                out[name] = column
            elif name in REQUIRED or given is not None:
                raise DataSourceError(f"{path}: no column {column!r} (data.table.columns.{name}); the file has "
                                      f"{', '.join(header[:30])}")
        numeric, categorical = list(data.table.extra_numeric), list(data.table.extra_categorical)
        both = sorted(set(numeric) & set(categorical))
        if both:
            raise DataSourceError(f"{path}: column {both[0]!r} is in both data.table.extra_numeric and "
                                  f"data.table.extra_categorical")
        for key, names in (("extra_numeric", numeric), ("extra_categorical", categorical)):
            for name in names:
                if name not in header:
                    raise DataSourceError(f"{path}: no column {name!r} (data.table.{key})")
        return out

    def read_table(self, data: Any, where: Path, *, labels: bool) -> pd.DataFrame:
        path = Path(where)
        if not path.is_file():
            raise DataSourceError(f"{path}: not a file (expected {self.new_posts})")
        frame = self._frame(data, path)
        mapping = self._mapping(data, path, [str(c) for c in frame.columns])
        cells = _Cells(path, frame, csv=self._format(data, path) != "parquet")
        n = len(frame)
        out: dict[str, Any] = {
            KEY: cells.ids(mapping[KEY]), "uid": cells.ids(mapping["uid"]),
            "postdate": cells.dates(mapping["postdate"], postdate_range(data)),
        }
        for name, column in OPTIONAL.items():
            source = mapping.get(name)
            if column in TEXT:
                out[column] = cells.text(source, none="")
            elif column in NULLABLE_TEXT:
                out[column] = cells.text(source, none=None)
            elif column in NUMBERS:
                out[column] = cells.numbers(source, LIMITS.get(column))
        out["geoaccuracy"] = cells.whole(mapping.get("geoaccuracy"), 0, GEOACCURACY_MAX)
        label = cells.numbers(mapping.get("label")) if labels else np.full(n, np.nan)
        split = np.where(np.isnan(label), "test", "train").astype(object)
        if "split" in mapping:
            given = cells.text(mapping["split"], none=None)
            for i, s in enumerate(given):
                if s is not None and s not in SPLITS:
                    raise cells.fail(mapping["split"], i, s, f"one of {', '.join(SPLITS)}")
            split = np.array([s if s is not None else d for s, d in zip(given, split)], dtype=object)
        if not labels and "split" not in mapping:
            split[:] = "test"
        out["label"] = np.where(split == "train", label, np.nan) if labels else label
        out["split"] = split
        relpaths = cells.text(mapping.get("image_path"), none="")
        out["image_relpath"] = relpaths
        out["image_status"] = _image_status(path.parent, relpaths, bool(data.check_images))
        posts = pd.DataFrame(out)
        posts["row"] = posts.groupby("split").cumcount().astype(np.int64)
        for column in COLUMNS:
            if column in VECTOR_COLUMNS:
                posts[column] = [None] * n
        posts = posts[list(COLUMNS)].astype({"postdate": np.int64, "geoaccuracy": np.int64})
        for name in data.table.extra_numeric:
            posts[EXTRA_NUMERIC + name] = cells.numbers(str(name))
        for name in data.table.extra_categorical:
            posts[EXTRA_CATEGORICAL + name] = cells.text(str(name), none="")
        order = {"train": 0, "test": 1}
        posts = posts.iloc[np.argsort(posts["split"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)
        dup = posts[KEY].duplicated(keep=False)
        if dup.any():
            first = posts[KEY][dup].iloc[0]
            rows = [cells.where(i) for i in np.flatnonzero(np.asarray(out[KEY], dtype=object) == first)]
            raise DataSourceError(f"{path}: column {mapping[KEY]!r}: duplicate post_id {first!r} "
                                  f"({' and '.join(rows)})")
        posts.attrs["repairs"] = {}
        return posts

    # ------------------------------------------------------------------ contract tests
    def write_example(self, posts: pd.DataFrame, raw: Path, directory: Path) -> list[str]:
        """A CSV of the posts (SMPD-style names for three fields, mapped in the overrides; dates as ISO text) with
        the images copied beside it."""
        folder = directory / "table"
        folder.mkdir(parents=True)
        for split in SPLITS:
            if (raw / split).is_dir():
                shutil.copytree(raw / split, folder / split)
        frame = posts[[c for c in self.carries if c not in ("row", "image_status")]].rename(columns={
            KEY: "Pid", "alltags": "Alltags", "image_relpath": "image_path", "uid": "owner"})
        frame["postdate"] = pd.to_datetime(frame["postdate"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        frame.to_csv(folder / "posts.csv", index=False)
        return ["data=table", f"data.table.path={folder / 'posts.csv'}", "data.table.columns.post_id=Pid",
                "data.table.columns.tags=Alltags", "data.table.columns.uid=owner"]


class _Cells:
    """Parsing the cells of one column, every failure naming the file, the row and the column."""

    def __init__(self, path: Path, frame: pd.DataFrame, csv: bool):
        self.path, self.frame, self.csv, self.n = path, frame, csv, len(frame)

    def where(self, i: int) -> str:
        return f"row {i} (line {i + 2})" if self.csv else f"row {i}"

    def fail(self, column: str, i: int, value: Any, expected: str) -> DataSourceError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return DataSourceError(f"{self.path}: {self.where(i)}, column {column!r}: {shown} is not {expected}")

    def values(self, column: str) -> list:
        return self.frame[column].tolist()

    def text(self, column: str | None, none: str | None) -> list:
        if column is None:
            return [none] * self.n
        out = []
        for i, v in enumerate(self.values(column)):
            if _null(v):
                out.append(none)
            elif isinstance(v, str):
                out.append(v)
            elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
                out.append(str(int(v)) if float(v).is_integer() else str(v))
            else:
                raise self.fail(column, i, v, "text")
        return out

    def ids(self, column: str) -> list[str]:
        out = self.text(column, none=None)
        for i, v in enumerate(out):
            if v is None or not v.strip():
                raise self.fail(column, i, self.values(column)[i], "an id (an empty id cannot be told apart)")
            out[i] = v.strip()
        return out

    def numbers(self, column: str | None, limit: float | None = None) -> np.ndarray:
        out = np.full(self.n, np.nan)
        if column is None:
            return out
        for i, v in enumerate(self.values(column)):
            if _null(v):
                continue
            try:
                x = float(v)
            except (TypeError, ValueError, OverflowError):
                raise self.fail(column, i, v, "a number") from None
            if isinstance(v, (bool, np.bool_)) or not math.isfinite(x):
                raise self.fail(column, i, v, "a finite number")
            if limit is not None and abs(x) > limit:
                raise self.fail(column, i, v, f"within [-{limit:g}, {limit:g}]")
            out[i] = x
        return out

    def whole(self, column: str | None, lo: int, hi: int) -> np.ndarray:
        values = self.numbers(column)
        for i, x in enumerate(values):
            if not np.isnan(x) and (x % 1 or not lo <= x <= hi):
                raise self.fail(column, i, self.values(column)[i], f"a whole number in [{lo}, {hi}]")
        return np.nan_to_num(values, nan=0).astype(np.int64)

    def dates(self, column: str, window: tuple[int, int]) -> np.ndarray:
        from popstack.datamodules.smpd import _utc_day

        out = np.zeros(self.n, dtype=np.int64)
        expected = "a date (epoch seconds, or a date / date-time string)"
        for i, v in enumerate(self.values(column)):
            seconds = None if _null(v) or isinstance(v, (bool, np.bool_)) else _epoch(v)
            if seconds is None:
                raise self.fail(column, i, v, expected)
            out[i] = seconds
            if not window[0] <= out[i] < window[1]:
                raise self.fail(column, i, v, f"a date in [{_utc_day(window[0])}, {_utc_day(window[1])}) "
                                              f"(data.postdate_range)")
        return out


def _epoch(v: Any) -> int | None:
    """Epoch seconds of a number, a numeric string or a date / date-time (string or timestamp; UTC when no zone
    is given); None when it is none of these."""
    try:
        x = float(v)
        return int(x) if math.isfinite(x) else None
    except (TypeError, ValueError, OverflowError):
        pass
    try:
        stamp = pd.Timestamp(v)
    except (TypeError, ValueError, OverflowError):
        return None
    if stamp is pd.NaT:
        return None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.timestamp())


def _image_status(folder: Path, relpaths: list[str], check_images: bool) -> list[str]:
    """As the SMPD reader (``smpd.image_statuses``, relative to the file's folder); a row without a path is
    ``missing``."""
    from popstack.datamodules.smpd import image_statuses

    given = [i for i, rel in enumerate(relpaths) if rel]
    out = [IMAGE_MISSING] * len(relpaths)
    for i, status in zip(given, image_statuses(folder, [relpaths[i] for i in given], check_images)):
        out[i] = status
    return out


SOURCE = TableSource()
