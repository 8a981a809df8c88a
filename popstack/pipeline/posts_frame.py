"""A user's DataFrame of posts checked against the posts schema (``datamodules.schema``) before any work.

    frame = normalise_frame(user_frame)     # canonical column names and types, or one UserError naming the column

- SMPD spellings are accepted and mapped (``Pid`` -> ``post_id``, ``Uid`` -> ``uid``, ``Title`` -> ``title``,
  ``Alltags``, ``Postdate``, ``Category``, ``Subcategory``, ``Concept``, ``Latitude``, ``Longitude``,
  ``Geoaccuracy``, ``Mediatype``, ``Pathalias``, ``Ispublic``, ``Mediastatus``, ``timezone_timezone_id``); a name
  given twice (``Title`` and ``title``) and the raw ``user_description``/``location_description`` (give
  ``user_vector``/``user_text``) are refused by name, as is any column the schema does not know.
- Types: text columns take strings (numbers are written as text; null is empty); ``postdate`` takes epoch
  seconds, a datetime or a date string (``"2015-03-01"``, read as UTC); numbers take numbers or numeric strings;
  vectors take a sequence of exactly their length (399/400 finite floats) or null. ``post_id`` and ``uid`` may not
  be null. Anything else is one ``UserError`` naming the column, the row and the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from popstack.datamodules.schema import (
    COLUMNS,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    KEY,
    NULLABLE_STRING_COLUMNS,
    SPLITS,
    VECTOR_COLUMNS,
)
from popstack.pipeline.errors import UserError

#: SMPD's own field names -> posts-table columns.
SMPD_NAMES = {
    "Pid": KEY, "Uid": "uid", "Title": "title", "Tile": "title", "Alltags": "alltags", "Postdate": "postdate",
    "Category": "category", "Subcategory": "subcategory", "Concept": "concept", "Latitude": "latitude",
    "Longitude": "longitude", "Geoaccuracy": "geoaccuracy", "Mediatype": "mediatype", "Pathalias": "pathalias",
    "Ispublic": "ispublic", "Mediastatus": "mediastatus", "timezone_timezone_id": "timezone_id",
    "image_relpath": "image_path",
}
#: SMPD fields that need a decision the API will not guess.
REFUSED = {"user_description": "user_vector (399 floats) or user_text",
           "location_description": "location_vector (400 floats) or location_text"}
#: Every column of the posts table (a posts table itself is a valid frame), the image path under its API name.
KNOWN = tuple(c for c in COLUMNS if c != "image_relpath") + ("image_path",)
TEXT_COLUMNS = ("uid", "category", "subcategory", "concept", "title", "alltags", "mediatype", "mediastatus",
                "image_status", *NULLABLE_STRING_COLUMNS)

_NAME = "posts DataFrame"


def _fail(column: str, i: int, value: Any, expected: str) -> UserError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return UserError(f"{_NAME}: column {column!r}, row {i}: {shown} is not {expected}")


def _null(v: Any) -> bool:
    if v is None or v is pd.NaT:
        return True
    try:
        return bool(isinstance(v, float) and math.isnan(v))
    except TypeError:
        return False


def _text(column: str, values: Sequence, nullable: bool) -> list:
    out = []
    for i, v in enumerate(values):
        if _null(v):
            out.append(None if nullable else "")
        elif isinstance(v, str):
            out.append(v)
        elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
            out.append(str(int(v)) if float(v).is_integer() else str(v))
        else:
            raise _fail(column, i, v, "text")
    return out


def _ids(column: str, values: Sequence) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if _null(v) or (isinstance(v, str) and not v.strip()):
            raise _fail(column, i, v, "an id (null or empty ids cannot be told apart)")
        text = _text(column, [v], nullable=False)[0]
        out.append(text.strip())
    return out


def _numbers(column: str, values: Sequence) -> np.ndarray:
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if _null(v) or (isinstance(v, str) and not v.strip()):
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError, OverflowError):
            raise _fail(column, i, v, "a number") from None
        if isinstance(v, (bool, np.bool_)) or not math.isfinite(out[i]):
            raise _fail(column, i, v, "a finite number")
    return out


def _postdate(values: Sequence) -> np.ndarray:
    out = np.zeros(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if _null(v):
            raise _fail("postdate", i, v, "a date (epoch seconds, a datetime or a date string)")
        if isinstance(v, str) and v.strip().lstrip("-").replace(".", "", 1).isdigit():
            v = float(v)
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
            if not math.isfinite(float(v)):
                raise _fail("postdate", i, v, "a finite number of epoch seconds")
            out[i] = int(v)
            continue
        try:
            stamp = pd.Timestamp(v)
        except (TypeError, ValueError):
            raise _fail("postdate", i, v, "a date (epoch seconds, a datetime or a date string)") from None
        if stamp is pd.NaT:
            raise _fail("postdate", i, v, "a date")
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        out[i] = int(stamp.timestamp())
    return out


def _vectors(column: str, values: Sequence) -> list:
    dim = VECTOR_COLUMNS[column]
    out = []
    for i, v in enumerate(values):
        if v is None or (not isinstance(v, (Sequence, np.ndarray)) and _null(v)):
            out.append(None)
            continue
        if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)):
            raise _fail(column, i, v, f"a sequence of {dim} numbers")
        try:
            vec = np.asarray(v, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise _fail(column, i, v, f"a sequence of {dim} numbers") from None
        if len(vec) != dim:
            raise UserError(f"{_NAME}: column {column!r}, row {i}: {len(vec)} values, expected {dim}")
        if not np.isfinite(vec).all():
            raise _fail(column, i, v, f"{dim} finite numbers")
        out.append(vec)
    return out


def normalise_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with posts-table column names and values checked and converted; see the module docstring."""
    if not isinstance(frame, pd.DataFrame):
        raise UserError(f"{_NAME}: expected a pandas DataFrame, got {type(frame).__name__}")
    names = [str(c) for c in frame.columns]
    refused = [c for c in names if c in REFUSED]
    if refused:
        raise UserError(f"{_NAME}: column {refused[0]!r} is ambiguous here; give {REFUSED[refused[0]]}")
    mapped = [SMPD_NAMES.get(c, c) for c in names]
    twice = sorted({m for m in mapped if mapped.count(m) > 1})
    if twice:
        spelled = [n for n, m in zip(names, mapped) if m == twice[0]]
        raise UserError(f"{_NAME}: columns {spelled} all mean {twice[0]!r}; keep one")
    unknown = [n for n, m in zip(names, mapped) if m not in KNOWN]
    if unknown:
        raise UserError(f"{_NAME}: unknown column(s) {unknown}; known: {', '.join(KNOWN)} (or their SMPD "
                        f"spellings {', '.join(SMPD_NAMES)})")
    frame = frame.set_axis(mapped, axis=1).reset_index(drop=True)
    out = {}
    for col in frame.columns:
        values = frame[col].tolist()
        if col == KEY:
            out[col] = _ids(col, values)
        elif col == "uid":
            out[col] = _ids(col, values)
        elif col == "image_path":
            out[col] = _text(col, values, nullable=False)
        elif col == "split":
            out[col] = _text(col, values, nullable=False)
            bad = [i for i, s in enumerate(out[col]) if s not in SPLITS]
            if bad:
                raise _fail(col, bad[0], values[bad[0]], f"one of {', '.join(SPLITS)}")
        elif col in TEXT_COLUMNS:
            out[col] = _text(col, values, nullable=col in NULLABLE_STRING_COLUMNS)
        elif col == "postdate":
            out[col] = _postdate(values)
        elif col in FLOAT_COLUMNS or col in INT_COLUMNS:
            out[col] = _numbers(col, values)
            if col in INT_COLUMNS:
                if np.any(out[col][~np.isnan(out[col])] % 1):
                    i = int(np.flatnonzero(np.nan_to_num(out[col]) % 1)[0])
                    raise _fail(col, i, values[i], "a whole number")
                out[col] = np.nan_to_num(out[col]).astype(np.int64)
        elif col in VECTOR_COLUMNS:
            out[col] = _vectors(col, values)
    return pd.DataFrame(out, index=frame.index)
