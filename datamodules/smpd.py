"""Reader for the real SMPD-Image release (SMPD_FORMAT.md): raw split folders or zips -> the posts table.

    posts = read_smpd("/data/SMPD")          # train rows then test rows, columns of datamodules.schema

Accepted layouts for a split (first match wins): ``<root>/{split}_allmetadata_json/``, the zips
``<root>/{split}_allmetadata_json.zip`` or ``<root>/SMP_image_{split}_metadata.zip``, ``<root>/{split}/`` holding the
metadata files, or the files directly in ``<root>``. Images are at ``<root>/{split}/<Uid>/<Pid>.jpg`` (the paths of
``{split}_img_filepath.txt``). Both file-name sets (2019-2025 and 2020) and both user-data variants are read.

Rows of every file of a split are aligned by position; (Uid, Pid) is verified across files and against the image path.
Errors name the file, the row and the field (``SMPDFormatError``). Missing images, empty titles/tags, missing
coordinates and null user fields are normal data: they are recorded, never fatal.

Speed: parsing the 399/400-float description vectors dominates; about 2 s per 10k variant-A rows on one core
(roughly 1.5 min for SMPD's 486k posts).
"""

from __future__ import annotations

import calendar
import io
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from datamodules.schema import (
    COLUMNS, FLOAT_COLUMNS, IMAGE_MISSING, IMAGE_OK, INT_COLUMNS, SPLITS, VECTOR_COLUMNS,
)


class SMPDFormatError(ValueError):
    """A raw SMPD file that does not follow the format; the message names file, row and field."""


#: Logical file -> accepted name suffixes, current (2019-2025) name first, then the 2020 name.
FILE_ALIASES: dict[str, tuple[str, ...]] = {
    "img_filepath": ("img_filepath.txt", "img.txt", "imgfile.txt"),
    "category": ("category.json",),
    "text": ("text.json", "tags.json"),
    "temporalspatial": ("temporalspatial_information.json", "temporalspatial.json"),
    "user": ("user_data.json", "userdata.json"),
    "additional": ("additional_information.json", "additional.json"),
}
VECTOR_MIN_COMMAS = 50  # a description with this many commas and only numbers is a vector (variant A)


# ----------------------------------------------------------------------------- file access
@dataclass
class SplitSource:
    """Where a split's metadata files live: a directory or a zip archive."""

    split: str
    where: Path
    zip_members: dict[str, str] | None = None  # basename -> member name, for zips

    def names(self) -> list[str]:
        if self.zip_members is not None:
            return list(self.zip_members)
        return [p.name for p in self.where.iterdir() if p.is_file()]

    def label(self, name: str) -> str:
        return f"{self.where}:{name}" if self.zip_members is not None else str(self.where / name)

    def read_bytes(self, name: str) -> bytes:
        if self.zip_members is not None:
            with zipfile.ZipFile(self.where) as zf:
                return zf.read(self.zip_members[name])
        return (self.where / name).read_bytes()

    def find(self, logical: str, required: bool = True) -> str | None:
        tried = [f"{self.split}_{suffix}" for suffix in FILE_ALIASES[logical]]
        present = set(self.names())
        for name in tried:
            if name in present:
                return name
        if required:
            raise SMPDFormatError(f"{self.where}: missing file for '{logical}' (tried {', '.join(tried)})")
        return None


def find_split(root: Path, split: str) -> SplitSource:
    """Locate the metadata of ``split`` under ``root`` (folder, zip, or files directly in root)."""
    if split not in SPLITS:
        raise SMPDFormatError(f"unknown split {split!r}; SMPD splits are {', '.join(SPLITS)}")
    if not root.is_dir():
        raise SMPDFormatError(f"{root}: SMPD root directory not found")
    marker = f"{split}_img_filepath.txt"
    candidates = [root / f"{split}_allmetadata_json", root / f"{split}_all_json", root / split, root]
    for cand in candidates:
        if cand.is_dir() and any((cand / f"{split}_{s}").is_file() for s in FILE_ALIASES["img_filepath"]):
            return SplitSource(split, cand)
    for zname in (f"{split}_allmetadata_json.zip", f"SMP_image_{split}_metadata.zip"):
        zpath = root / zname
        if zpath.is_file():
            try:
                with zipfile.ZipFile(zpath) as zf:
                    members = {Path(m).name: m for m in zf.namelist() if not m.endswith("/")}
            except zipfile.BadZipFile as err:
                raise SMPDFormatError(f"{zpath}: not a readable zip ({err})") from err
            return SplitSource(split, zpath, members)
    raise SMPDFormatError(
        f"{root}: no metadata for split '{split}' (looked for {marker} in {split}_allmetadata_json/, {split}/, "
        f"the root, and {split}_allmetadata_json.zip)"
    )


def _load_json(src: SplitSource, name: str) -> Any:
    raw = src.read_bytes(name)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise SMPDFormatError(
            f"{src.label(name)}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})"
        ) from err


def _records(src: SplitSource, name: str) -> list[dict[str, Any]]:
    """A list-of-objects file; also accepts the pandas columnar form ``{col: {"0": v}}``."""
    data = _load_json(src, name)
    if isinstance(data, dict):
        return _columnar_to_records(src, name, data)
    if not isinstance(data, list):
        raise SMPDFormatError(f"{src.label(name)}: expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise SMPDFormatError(f"{src.label(name)}: row {i} is {type(rec).__name__}, expected an object")
    return data


def _columnar_to_records(src: SplitSource, name: str, data: dict) -> list[dict[str, Any]]:
    columns = {k: v for k, v in data.items()}
    lengths = set()
    for col, values in columns.items():
        if not isinstance(values, dict):
            raise SMPDFormatError(f"{src.label(name)}: column '{col}' is not an object keyed by row index")
        lengths.add(len(values))
    if len(lengths) > 1:
        raise SMPDFormatError(f"{src.label(name)}: columns have different lengths {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for col, values in columns.items():
        for key, value in values.items():
            try:
                i = int(key)
            except ValueError as err:
                raise SMPDFormatError(f"{src.label(name)}: column '{col}' has non-integer row key {key!r}") from err
            if not 0 <= i < n:
                raise SMPDFormatError(f"{src.label(name)}: column '{col}' row key {key} outside 0..{n - 1}")
            rows[i][col] = value
    return rows


def _lines(src: SplitSource, name: str) -> list[str]:
    text = src.read_bytes(name).decode("utf-8-sig")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- value parsing
def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip() in ("", "None", "nan", "NaN", "null"))


def _float_or_nan(v: Any) -> float:
    if _is_null(v):
        return np.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return np.nan


def _epoch(v: Any) -> float:
    """Epoch seconds from a number, a numeric string, or a ``YYYY-MM-DD HH:MM:SS`` string (UTC); NaN if null."""
    if _is_null(v):
        return np.nan
    if isinstance(v, (int, float)):
        return float(v)
    s = str(v).strip()
    try:
        return float(s)
    except ValueError:
        pass
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(s, fmt)))
        except ValueError:
            continue
    return np.nan


def _str_or_none(v: Any) -> str | None:
    return None if _is_null(v) else str(v)


def _description(v: Any, dim: int, where: Callable[[], str]) -> tuple[np.ndarray | None, str | None]:
    """(vector, text) of a user/location description: variant A float list, variant B free text, or null."""
    if _is_null(v):
        return None, None
    s = str(v).strip().strip("\r\n").rstrip(",").strip()
    if not s:
        return None, None
    if s.count(",") >= VECTOR_MIN_COMMAS:
        try:
            vec = np.array(s.replace("\n", "").replace("\r", "").split(","), dtype=np.float32)
        except ValueError:
            return None, s  # a long comma-separated text, not a vector
        if len(vec) != dim:
            raise SMPDFormatError(f"{where()}: description vector has {len(vec)} values, expected {dim}")
        return vec, None
    return None, s


def _image_path(line: str) -> str:
    return line.strip().strip('"').strip("'").replace("\\", "/")


def _pid(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


# ----------------------------------------------------------------------------- the reader
def read_split(root: str | Path, split: str, *, check_images: bool = True, labels: bool = True) -> pd.DataFrame:
    """Read one split into the posts table (``datamodules.schema`` columns); see the module docstring.

    ``labels=False`` reads no label file at all (inference on new posts): every label is NaN.
    """
    root = Path(root)
    src = find_split(root, split)
    paths = [_image_path(ln) for ln in _lines(src, src.find("img_filepath"))]
    n = len(paths)
    files = {key: src.find(key) for key in ("category", "text", "temporalspatial", "additional", "user")}
    tables = {key: _records(src, name) for key, name in files.items()}
    for key, rows in tables.items():
        if len(rows) != n:
            raise SMPDFormatError(
                f"{src.label(files[key])}: {len(rows)} rows but {src.label(src.find('img_filepath'))} lists {n} "
                f"images (files must be row-aligned)"
            )

    # alignment: (Uid, Pid) of every file and of the image path
    uids, pids = [], []
    for i, path in enumerate(paths):
        parts = path.split("/")
        if len(parts) < 2:
            raise SMPDFormatError(f"{src.label(src.find('img_filepath'))}: row {i}: image path {path!r} is not <split>/<Uid>/<Pid>.jpg")
        uid, pid = parts[-2], Path(parts[-1]).stem
        for key, rows in tables.items():
            rec = rows[i]
            for field, expected in (("Uid", uid), ("Pid", pid)):
                if field not in rec:
                    raise SMPDFormatError(f"{src.label(files[key])}: row {i}: field '{field}' missing")
                got = _pid(rec[field]) if field == "Pid" else str(rec[field]).strip()
                if got != expected:
                    raise SMPDFormatError(
                        f"{src.label(files[key])}: row {i}: field '{field}' is {got!r} but the image path says "
                        f"{expected!r} (rows misaligned?)"
                    )
        uids.append(uid)
        pids.append(pid)
    seen: dict[str, int] = {}
    for i, pid in enumerate(pids):
        if pid in seen:
            raise SMPDFormatError(
                f"{src.label(src.find('img_filepath'))}: duplicate Pid {pid} at rows {seen[pid]} and {i}"
            )
        seen[pid] = i

    cat, text, ts, add, user = (tables[k] for k in ("category", "text", "temporalspatial", "additional", "user"))

    def field(key: str, i: int, name: str, aliases: tuple[str, ...] = (), required: bool = True) -> Any:
        rec = tables[key][i]
        for candidate in (name, *aliases):
            if candidate in rec:
                return rec[candidate]
        if required:
            raise SMPDFormatError(f"{src.label(files[key])}: row {i}: field '{name}' missing")
        return None

    def postdate(i: int) -> int:
        v = field("temporalspatial", i, "Postdate")
        try:
            return int(float(v))
        except (TypeError, ValueError) as err:
            raise SMPDFormatError(
                f"{src.label(files['temporalspatial'])}: row {i}: field 'Postdate' is {v!r}, expected epoch seconds"
            ) from err

    def coord(i: int, name: str) -> float:
        x = _float_or_nan(field("temporalspatial", i, name))
        return np.nan if x == 0.0 else x

    lat = np.array([coord(i, "Latitude") for i in range(n)])
    lon = np.array([coord(i, "Longitude") for i in range(n)])
    geoacc = np.nan_to_num(
        np.array([_float_or_nan(field("temporalspatial", i, "Geoaccuracy")) for i in range(n)]), nan=0.0
    ).astype(np.int64)
    no_geo = np.isnan(lat) | np.isnan(lon) | (geoacc == 0)
    lat[no_geo], lon[no_geo] = np.nan, np.nan

    user_vec, user_txt, loc_vec, loc_txt = [], [], [], []
    user_label = src.label(files["user"])
    for i in range(n):
        uv, ut = _description(field("user", i, "user_description", required=False), VECTOR_COLUMNS["user_vector"],
                              lambda i=i: f"{user_label}: row {i}: field 'user_description'")
        lv, lt = _description(field("user", i, "location_description", required=False),
                              VECTOR_COLUMNS["location_vector"],
                              lambda i=i: f"{user_label}: row {i}: field 'location_description'")
        user_vec.append(uv)
        user_txt.append(ut)
        loc_vec.append(lv)
        loc_txt.append(lt)

    label_values = np.full(n, np.nan)
    if split == "train" and labels:
        label_name = "train_label.txt"
        if label_name not in src.names():
            raise SMPDFormatError(f"{src.where}: missing file train_label.txt (the train split must be labelled)")
        lines = _lines(src, label_name)
        if lines and not _is_number(lines[0]) and len(lines) == n + 1:
            lines = lines[1:]  # a caption line such as "Popularityscore"
        if len(lines) != n:
            raise SMPDFormatError(f"{src.label(label_name)}: {len(lines)} labels but {n} images (must be row-aligned)")
        for i, ln in enumerate(lines):
            try:
                label_values[i] = float(ln)
            except ValueError as err:
                raise SMPDFormatError(f"{src.label(label_name)}: line {i + 1}: label {ln!r} is not a number") from err
            if not np.isfinite(label_values[i]):
                raise SMPDFormatError(f"{src.label(label_name)}: line {i + 1}: label {ln!r} is not finite")
    # test splits: a label file, if any, is ignored (test labels were never released)

    if check_images:
        status = []
        for path in paths:
            f = root / path
            status.append(IMAGE_OK if f.is_file() and f.stat().st_size > 0 else IMAGE_MISSING)
    else:
        status = [IMAGE_OK] * n

    posts = pd.DataFrame({
        "post_id": pids,
        "uid": uids,
        "split": split,
        "row": np.arange(n, dtype=np.int64),
        "image_relpath": paths,
        "image_status": status,
        "category": [str(field("category", i, "Category")) for i in range(n)],
        "subcategory": [str(field("category", i, "Subcategory")) for i in range(n)],
        "concept": [str(field("category", i, "Concept")) for i in range(n)],
        "title": [_str_or_none(field("text", i, "Title", ("Tile",), required=False)) or "" for i in range(n)],
        "alltags": [_str_or_none(field("text", i, "Alltags", required=False)) or "" for i in range(n)],
        "mediatype": [_str_or_none(field("text", i, "Mediatype", required=False)) or "" for i in range(n)],
        "postdate": np.array([postdate(i) for i in range(n)], dtype=np.int64),
        "latitude": lat,
        "longitude": lon,
        "geoaccuracy": geoacc,
        "pathalias": [_str_or_none(field("additional", i, "Pathalias", required=False)) for i in range(n)],
        "ispublic": [_float_or_nan(field("additional", i, "Ispublic", required=False)) for i in range(n)],
        "mediastatus": [_str_or_none(field("additional", i, "Mediastatus", required=False)) or "" for i in range(n)],
        "photo_firstdate": [_epoch(field("user", i, "photo_firstdate", required=False)) for i in range(n)],
        "photo_firstdatetaken": [_epoch(field("user", i, "photo_firstdatetaken", required=False)) for i in range(n)],
        "photo_count": [_float_or_nan(field("user", i, "photo_count", required=False)) for i in range(n)],
        "ispro": [_float_or_nan(field("user", i, "ispro", required=False)) for i in range(n)],
        "canbuypro": [_float_or_nan(field("user", i, "canbuypro", required=False)) for i in range(n)],
        "timezone_offset": [_str_or_none(field("user", i, "timezone_offset", required=False)) for i in range(n)],
        "timezone_id": [_str_or_none(field("user", i, "timezone_id", ("timezone_timezone_id",), required=False))
                        for i in range(n)],
        "user_vector": user_vec,
        "user_text": user_txt,
        "location_vector": loc_vec,
        "location_text": loc_txt,
        "label": label_values,
    })
    return _typed(posts)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _typed(posts: pd.DataFrame) -> pd.DataFrame:
    for col in INT_COLUMNS:
        posts[col] = posts[col].astype(np.int64)
    for col in FLOAT_COLUMNS:
        posts[col] = posts[col].astype(np.float64)
    return posts[list(COLUMNS)]


def read_smpd(root: str | Path, splits: tuple[str, ...] = SPLITS, *, check_images: bool = True,
              labels: bool = True) -> pd.DataFrame:
    """Read several splits (train rows first) into one posts table; Pids must be unique across splits.

    A split listed in ``splits`` but absent from ``root`` is an error except for ``test``, which may be missing
    (a labelled-only directory); with ``labels=False`` (inference) any absent split is skipped, but at least one
    must be there. An unknown split name is always an error.
    """
    root = Path(root)
    frames = []
    for split in splits:
        try:
            frames.append(read_split(root, split, check_images=check_images, labels=labels))
        except SMPDFormatError as err:
            if (split == "test" or not labels) and "no metadata for split" in str(err):
                continue
            raise
    if not frames:
        raise SMPDFormatError(f"{root}: no SMPD split found (looked for {', '.join(splits)})")
    posts = pd.concat(frames, ignore_index=True)
    dup = posts.post_id.duplicated(keep=False)
    if dup.any():
        rows = posts.loc[dup, ["split", "row", "post_id"]].head(4).to_dict("records")
        raise SMPDFormatError(f"{root}: duplicate Pid across splits: {rows}")
    return posts


# ----------------------------------------------------------------------------- parquet round trip
def write_posts(posts: pd.DataFrame, path: str | Path) -> None:
    """Write the posts table to parquet, keeping the vector columns as nullable list<float32>."""
    arrays = {}
    for col in COLUMNS:
        if col in VECTOR_COLUMNS:
            arrays[col] = pa.array([None if v is None else np.asarray(v, dtype=np.float32) for v in posts[col]],
                                   type=pa.list_(pa.float32()))
        else:
            arrays[col] = pa.array(posts[col].tolist() if posts[col].dtype == object else posts[col].to_numpy(),
                                   from_pandas=True)
    pq.write_table(pa.table(arrays), path)


def read_posts(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a posts table written by ``write_posts``; vector cells come back as float32 arrays (or None)."""
    table = pq.read_table(path, columns=columns)
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if name in VECTOR_COLUMNS:
            out[name] = [None if v is None else np.asarray(v, dtype=np.float32) for v in col.to_pylist()]
        else:
            out[name] = col.to_pandas()
    return pd.DataFrame(out)


def vector_matrix(posts: pd.DataFrame, column: str) -> np.ndarray:
    """(n, dim) float32 matrix of a vector column; rows without a vector are NaN."""
    dim = VECTOR_COLUMNS[column]
    out = np.full((len(posts), dim), np.nan, dtype=np.float32)
    for i, v in enumerate(posts[column]):
        if v is not None:
            out[i] = v
    return out
