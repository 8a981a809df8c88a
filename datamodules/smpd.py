"""Reader for the real SMPD-Image release (``/work/shared/SMPD_FORMAT.md``): raw split folders or zips -> posts table.

    posts = read_smpd("/data/SMPD")          # train rows then test rows, the columns of datamodules.schema

Where a split's metadata is looked for (first match wins): ``<root>/{split}_allmetadata_json/``,
``<root>/{split}_all_json/`` (2020 teams), ``<root>/{split}/``, the files directly in ``<root>``, then the zips
``<root>/{split}_allmetadata_json.zip`` and ``<root>/SMP_image_{split}_metadata.zip`` (members are read from the zip,
nothing is extracted). Images are at ``<root>/{split}/<Uid>/<Pid>.jpg``, the paths listed in
``{split}_img_filepath.txt`` (whitespace and quotes stripped, ``\\`` -> ``/``; a Flickr URL line
``https://www.flickr.com/photos/<Uid>/<Pid>`` as in the 2020 ``train_img.txt`` becomes ``{split}/<Uid>/<Pid>.jpg``).

Both file-name sets are read (2019-2025: ``_text``, ``_temporalspatial_information``, ``_user_data``,
``_additional_information``; 2020: ``_tags``, ``_temporalspatial``, ``_userdata``, ``_additional``); list files may
also be columnar and the user file may be a list of records.

Conversions (raw -> schema):

* every file is row-aligned: (Uid, Pid) of each file must equal the image path's, row by row;
* ``Postdate`` -> int epoch seconds; ``Latitude``/``Longitude`` ``""``, ``"0"`` or null -> NaN, and a post keeps
  coordinates only when both are present; ``Geoaccuracy`` -> int, ``"0"``/null -> 0; ``Pathalias`` ``"None"`` -> None;
  ``Title`` (alias ``Tile``), ``Alltags``, ``Mediatype``, ``Mediastatus``, ``Category``, ``Subcategory``, ``Concept``:
  null -> ``""``;
* user fields are all nullable (null, ``""``, ``"None"`` -> missing); ``timezone_id`` or ``timezone_timezone_id``;
  ``canbuypro`` optional; ``photo_firstdate``/``photo_firstdatetaken`` are epoch numbers or ``YYYY-MM-DD HH:MM:SS``
  (UTC) strings; a value that is neither becomes NaN and is counted in a logged warning (the fields are opaque in
  the real data, e.g. ``"1904010100"``, so they never stop a run);
* ``user_description``/``location_description``: the variant is detected per column. Variant A: comma-separated
  399/400 floats (whitespace, CR/LF and trailing commas stripped; an empty string -> None) -> float32 vector;
  variant B: free text -> ``user_text``/``location_text``;
* labels: ``train_label.txt`` (one float per line; one non-numeric caption line such as ``Popularityscore`` is
  skipped). Only the train split is labelled: a label file in a test split is ignored (test labels were never
  released, and a stray file must not leak into training). A train split without labels is an error unless
  ``labels=False`` (inference on new posts);
* ``image_status``: ``"ok"`` if the file exists and is non-empty, else ``"missing"``. The reader never decodes images:
  a corrupt or truncated JPEG stays ``"ok"`` here and the shard writer marks it ``"unreadable"``.
  ``check_images=False`` skips the stat calls (every status ``"ok"``).

Bad input raises ``SMPDFormatError`` naming the file, the row (or line) and the field. Empty titles and tags, missing
coordinates, unknown users and missing images are normal data, never errors.

Speed (2-core machine, one process): 20k variant-A posts read in about 0.8 s, so SMPD's 486k posts take about
20 s plus the image stat calls; the 399/400-float vectors are parsed one column at a time (one ``split`` and one
float32 conversion per column) and take about 1.5 GB for 486k posts.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from datamodules.schema import (
    COLUMNS, FLOAT_COLUMNS, IMAGE_MISSING, IMAGE_OK, INT_COLUMNS, NULLABLE_STRING_COLUMNS, SPLITS, STRING_COLUMNS,
    VECTOR_COLUMNS,
)

log = logging.getLogger(__name__)


class SMPDFormatError(ValueError):
    """A raw SMPD file that does not follow the format; the message names the file, the row and the field."""


class SplitNotFoundError(SMPDFormatError):
    """No metadata of the requested split exists under the root."""


#: Logical file -> accepted name suffixes after ``{split}_``; the 2019-2025 name first, then the 2020 names.
FILE_ALIASES: dict[str, tuple[str, ...]] = {
    "img_filepath": ("img_filepath.txt", "img.txt", "imgfile.txt"),
    "category": ("category.json",),
    "text": ("text.json", "tags.json"),
    "temporalspatial": ("temporalspatial_information.json", "temporalspatial.json"),
    "user": ("user_data.json", "userdata.json"),
    "additional": ("additional_information.json", "additional.json"),
}
METADATA_FILES: tuple[str, ...] = ("category", "text", "temporalspatial", "additional", "user")
LABEL_FILE = "train_label.txt"
LABELLED_SPLIT = "train"
FLICKR_PHOTOS = "flickr.com/photos/"
#: Raw values that mean "missing" in user and additional fields.
NULL_TOKENS = frozenset({"", "None", "none", "null", "NaN", "nan"})
#: Raw coordinate values that mean "no geotag".
NO_COORDINATE_TOKENS = frozenset({"", "0", "0.0"})
_ABSENT = object()


# ----------------------------------------------------------------------------- file access
@dataclass
class SplitSource:
    """Where a split's metadata files live: a directory, or a zip archive (``zip_members``: basename -> member)."""

    split: str
    where: Path
    zip_members: dict[str, str] | None = None

    def names(self) -> list[str]:
        if self.zip_members is not None:
            return list(self.zip_members)
        return [p.name for p in self.where.iterdir() if p.is_file()]

    def label(self, name: str) -> str:
        """How messages name a file: its path, or ``archive.zip:member``."""
        if self.zip_members is not None:
            return f"{self.where}:{self.zip_members[name]}"
        return str(self.where / name)

    def read_bytes(self, name: str) -> bytes:
        if self.zip_members is not None:
            with zipfile.ZipFile(self.where) as zf:
                return zf.read(self.zip_members[name])
        return (self.where / name).read_bytes()

    def find(self, logical: str) -> str:
        """The file name of a logical file (``FILE_ALIASES`` key); error naming every name tried."""
        tried = [f"{self.split}_{suffix}" for suffix in FILE_ALIASES[logical]]
        present = set(self.names())
        for name in tried:
            if name in present:
                return name
        raise SMPDFormatError(f"{self.where}: missing {logical} file (tried {', '.join(tried)})")


def find_split(root: Path, split: str) -> SplitSource:
    """Locate the metadata of ``split`` under ``root`` (see the module docstring for the order)."""
    if split not in SPLITS:
        raise SMPDFormatError(f"unknown split {split!r}; SMPD splits are {', '.join(SPLITS)}")
    if not root.is_dir():
        raise SMPDFormatError(f"{root}: SMPD root directory not found")
    image_lists = [f"{split}_{suffix}" for suffix in FILE_ALIASES["img_filepath"]]
    folders = [root / f"{split}_allmetadata_json", root / f"{split}_all_json", root / split, root]
    for folder in folders:
        if folder.is_dir() and any((folder / name).is_file() for name in image_lists):
            return SplitSource(split, folder)
    zips = [root / f"{split}_allmetadata_json.zip", root / f"SMP_image_{split}_metadata.zip"]
    for zpath in zips:
        if zpath.is_file():
            try:
                with zipfile.ZipFile(zpath) as zf:
                    members = {Path(m).name: m for m in zf.namelist() if not m.endswith("/")}
            except zipfile.BadZipFile as err:
                raise SMPDFormatError(f"{zpath}: not a readable zip ({err})") from err
            return SplitSource(split, zpath, members)
    raise SplitNotFoundError(
        f"{root}: no metadata for split '{split}' (looked for {' / '.join(image_lists)} in "
        f"{', '.join(str(f) for f in folders)}, and for the zips {', '.join(z.name for z in zips)})"
    )


def _load_json(src: SplitSource, name: str) -> Any:
    try:
        return json.loads(src.read_bytes(name))
    except json.JSONDecodeError as err:
        raise SMPDFormatError(
            f"{src.label(name)}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg}); truncated file?"
        ) from err
    except UnicodeDecodeError as err:
        raise SMPDFormatError(f"{src.label(name)}: not UTF-8 text ({err})") from err


def _records(label: str, data: Any) -> list[dict[str, Any]]:
    """Rows of a metadata file: a list of objects, or the pandas columnar form ``{column: {"0": value, ...}}``."""
    if isinstance(data, dict):
        return _columnar_to_records(label, data)
    if not isinstance(data, list):
        raise SMPDFormatError(f"{label}: expected a JSON list of records or an object of columns, "
                              f"got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise SMPDFormatError(f"{label}: row {i} is a JSON {type(rec).__name__}, expected an object")
    return data


def _columnar_to_records(label: str, data: dict) -> list[dict[str, Any]]:
    n = max((len(v) for v in data.values() if isinstance(v, dict)), default=0)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for col, values in data.items():
        if not isinstance(values, dict):
            raise SMPDFormatError(f"{label}: column '{col}' is a JSON {type(values).__name__}, "
                                  f"expected an object keyed by row index")
        if len(values) != n:
            raise SMPDFormatError(f"{label}: column '{col}' has {len(values)} rows, other columns have {n}")
        for key, value in values.items():
            i = int(key) if key.isdigit() else -1
            if not 0 <= i < n:
                raise SMPDFormatError(f"{label}: column '{col}' has row key {key!r}, expected 0..{n - 1}")
            rows[i][col] = value
    return rows


def _lines(src: SplitSource, name: str) -> list[str]:
    """Non-blank lines, stripped (trailing blank lines are common)."""
    try:
        text = src.read_bytes(name).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SMPDFormatError(f"{src.label(name)}: not UTF-8 text ({err})") from err
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


@dataclass
class MetadataFile:
    """One row-aligned metadata file of a split: its name in messages and its rows."""

    label: str
    rows: list[dict[str, Any]]

    def where(self, row: int, field: str) -> str:
        return f"{self.label}: row {row}: field '{field}'"

    def values(self, field: str, aliases: tuple[str, ...] = (), *, required: bool = False) -> list[Any]:
        """The field's value per row (first name present of ``field``, ``aliases``); None where absent.

        ``required``: a row without the field is an error naming the row.
        """
        values = [rec.get(field, _ABSENT) for rec in self.rows]
        if not values.count(_ABSENT):
            return values
        for i in (i for i, v in enumerate(values) if v is _ABSENT):
            rec = self.rows[i]
            found = next((rec[a] for a in aliases if a in rec), _ABSENT)
            if found is _ABSENT and required:
                raise SMPDFormatError(f"{self.where(i, field)} missing")
            values[i] = None if found is _ABSENT else found
        return values


# ----------------------------------------------------------------------------- column parsing
def _is_null(v: Any, tokens: frozenset[str]) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip() in tokens)


def _numbers(values: list[Any], file: MetadataFile, field: str, nulls: frozenset[str] = NULL_TOKENS) -> np.ndarray:
    """float64 per row; null values (None, NaN, ``nulls``) -> NaN; anything else non-numeric is an error."""
    raw = pd.Series(values, dtype=object)
    null = np.array([_is_null(v, nulls) for v in values], dtype=bool)
    out = np.full(len(values), np.nan)
    parsed = pd.to_numeric(raw[~null], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(parsed))
    if len(bad):
        i = int(np.flatnonzero(~null)[bad[0]])
        raise SMPDFormatError(f"{file.where(i, field)} is {values[i]!r}, expected a number "
                              f"({len(bad)} such rows in the file)")
    out[~null] = parsed
    return out


def _epochs(values: list[Any], file: MetadataFile, field: str) -> np.ndarray:
    """Epoch seconds (float64) from epoch numbers/strings or ``YYYY-MM-DD[ HH:MM:SS]`` UTC strings.

    Null -> NaN. Any other value -> NaN, counted in one warning (the fields are opaque in the real data).
    """
    raw = pd.Series(values, dtype=object)
    null = np.array([_is_null(v, NULL_TOKENS) for v in values], dtype=bool)
    out = np.array(pd.to_numeric(raw.where(~null), errors="coerce"), dtype=np.float64)
    dates = np.flatnonzero(~null & np.isnan(out))
    if len(dates):
        stamps = pd.to_datetime(raw.iloc[dates].astype(str).str.strip(), format="ISO8601", errors="coerce", utc=True)
        out[dates] = ((stamps - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
        failed = dates[np.isnan(out[dates])]
        if len(failed):
            log.warning("%s: %d values are neither epoch seconds nor dates, read as missing (first: row %d, %r)",
                        f"{file.label}: field '{field}'", len(failed), failed[0], values[failed[0]])
    return out


def _texts(values: list[Any], nulls: frozenset[str] = frozenset()) -> list[str | None]:
    """Strings per row; None for null values or ``nulls``; integer-valued numbers without ``.0`` (``12.0`` -> ``"12"``)."""
    out: list[str | None] = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(None if _is_null(v, nulls) else str(v).strip())
    return out


def _clean_vector_text(s: str) -> str:
    """A variant-A vector string without whitespace, CR/LF or trailing commas (real files carry such junk)."""
    return "".join(s.split()).strip(",")


def _is_number_list(s: str) -> bool:
    try:
        np.array(s.split(","), dtype=np.float32)
    except ValueError:
        return False
    return True


def _descriptions(values: list[Any], dim: int, file: MetadataFile, field: str, chunk_rows: int = 4096
                  ) -> tuple[list[np.ndarray | None], list[str | None]]:
    """(vectors, texts) of a description column; the variant is detected for the whole column.

    Variant A (most of the first 1000 non-empty values are comma lists of numbers): every non-empty value must hold
    ``dim`` numbers; rows become float32 (dim,) views into one (k, dim) matrix, parsed ``chunk_rows`` rows at a time
    to bound the temporary strings; empty -> None; texts all None. Variant B (free text): texts; vectors all None.
    """
    n = len(values)
    texts = _texts(values, NULL_TOKENS)
    present = [i for i, t in enumerate(texts) if t]
    cleaned = [_clean_vector_text(texts[i]) for i in present]
    none: list[Any] = [None] * n
    sample = cleaned[:1000]
    if sum("," in s and _is_number_list(s) for s in sample) * 2 <= len(sample):
        return none, texts  # variant B (or an empty column)
    counts = np.array([s.count(",") + 1 for s in cleaned])
    wrong = np.flatnonzero(counts != dim)
    if len(wrong):
        j = int(wrong[0])
        raise SMPDFormatError(f"{file.where(present[j], field)}: description vector has {counts[j]} values, "
                              f"expected {dim} ({len(wrong)} such rows in the file)")
    matrix = np.empty((len(present), dim), dtype=np.float32)
    for start in range(0, len(present), chunk_rows):
        block = cleaned[start:start + chunk_rows]
        try:
            matrix[start:start + len(block)] = np.array(",".join(block).split(","), dtype=np.float32).reshape(-1, dim)
        except ValueError:
            j = start + next(j for j, s in enumerate(block) if not _is_number_list(s))
            raise SMPDFormatError(f"{file.where(present[j], field)}: value {texts[present[j]][:60]!r} is not a list "
                                  f"of {dim} numbers (the column holds number lists)") from None
    vectors = list(none)
    for j, i in enumerate(present):
        vectors[i] = matrix[j]
    return vectors, list(none)


def _image_path(line: str, split: str) -> str:
    """A normalised ``{split}/<Uid>/<Pid>.jpg`` path from one line of the image list."""
    path = line.strip().strip('"').strip("'").strip().replace("\\", "/")
    if FLICKR_PHOTOS in path:
        uid, pid = path.split(FLICKR_PHOTOS, 1)[1].strip("/").split("/")[:2]
        return f"{split}/{uid}/{pid}.jpg"
    return path


def _pid(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


# ----------------------------------------------------------------------------- the reader
def read_split(root: str | Path, split: str, *, check_images: bool = True, labels: bool = True) -> pd.DataFrame:
    """One split as the posts table (``datamodules.schema.COLUMNS`` in order, with their dtypes), file order.

    Args:
        root: the SMPD directory (see the module docstring for the layouts found).
        split: ``"train"`` or ``"test"``.
        check_images: stat every image (missing/empty -> ``"missing"``); False: all ``"ok"``, no file-system calls.
        labels: read ``train_label.txt`` for the train split (required then). False: no labels (inference), all NaN.

    Raises:
        SMPDFormatError: naming the file, row and field of the first problem found.
    """
    root = Path(root)
    src = find_split(root, split)
    image_list = src.find("img_filepath")
    paths = [_image_path(ln, split) for ln in _lines(src, image_list)]
    n = len(paths)
    files = {}
    for key in METADATA_FILES:
        name = src.find(key)
        files[key] = MetadataFile(src.label(name), _records(src.label(name), _load_json(src, name)))
        if len(files[key].rows) != n:
            raise SMPDFormatError(f"{files[key].label}: {len(files[key].rows)} rows but {src.label(image_list)} lists "
                                  f"{n} images (the files of a split must be row-aligned)")

    uids, pids = _keys_from_paths(paths, src.label(image_list))
    for file in files.values():
        _check_alignment(file, uids, pids)
    _check_unique(pids, src.label(image_list))

    cat, text, ts, add, user = (files[k] for k in METADATA_FILES)
    lat = _numbers(ts.values("Latitude", required=True), ts, "Latitude", NO_COORDINATE_TOKENS)
    lon = _numbers(ts.values("Longitude", required=True), ts, "Longitude", NO_COORDINATE_TOKENS)
    no_geo = np.isnan(lat) | np.isnan(lon)
    lat[no_geo], lon[no_geo] = np.nan, np.nan
    postdate = _numbers(ts.values("Postdate", required=True), ts, "Postdate", frozenset())
    if np.isnan(postdate).any():
        raise SMPDFormatError(f"{ts.where(int(np.flatnonzero(np.isnan(postdate))[0]), 'Postdate')} is null, "
                              f"expected epoch seconds")
    geoaccuracy = np.nan_to_num(_numbers(ts.values("Geoaccuracy"), ts, "Geoaccuracy"), nan=0.0)
    user_vector, user_text = _descriptions(user.values("user_description"), VECTOR_COLUMNS["user_vector"], user,
                                           "user_description")
    location_vector, location_text = _descriptions(user.values("location_description"),
                                                   VECTOR_COLUMNS["location_vector"], user, "location_description")

    columns = {
        "post_id": pids,
        "uid": uids,
        "split": [split] * n,
        "row": np.arange(n),
        "image_relpath": paths,
        "image_status": _image_status(root, paths) if check_images else [IMAGE_OK] * n,
        "category": _texts(cat.values("Category", required=True)),
        "subcategory": _texts(cat.values("Subcategory", required=True)),
        "concept": _texts(cat.values("Concept", required=True)),
        "title": _texts(text.values("Title", ("Tile",))),
        "alltags": _texts(text.values("Alltags")),
        "mediatype": _texts(text.values("Mediatype")),
        "postdate": postdate,
        "latitude": lat,
        "longitude": lon,
        "geoaccuracy": geoaccuracy,
        "pathalias": _texts(add.values("Pathalias"), NULL_TOKENS),
        "ispublic": _numbers(add.values("Ispublic"), add, "Ispublic"),
        "mediastatus": _texts(add.values("Mediastatus")),
        "photo_firstdate": _epochs(user.values("photo_firstdate"), user, "photo_firstdate"),
        "photo_firstdatetaken": _epochs(user.values("photo_firstdatetaken"), user, "photo_firstdatetaken"),
        "photo_count": _numbers(user.values("photo_count"), user, "photo_count"),
        "ispro": _numbers(user.values("ispro"), user, "ispro"),
        "canbuypro": _numbers(user.values("canbuypro"), user, "canbuypro"),
        "timezone_offset": _texts(user.values("timezone_offset"), NULL_TOKENS),
        "timezone_id": _texts(user.values("timezone_id", ("timezone_timezone_id",)), NULL_TOKENS),
        "user_vector": user_vector,
        "user_text": user_text,
        "location_vector": location_vector,
        "location_text": location_text,
        "label": _labels(src, n) if split == LABELLED_SPLIT and labels else np.full(n, np.nan),
    }
    return to_schema(columns)


def _keys_from_paths(paths: list[str], label: str) -> tuple[list[str], list[str]]:
    uids, pids = [], []
    for i, path in enumerate(paths):
        parts = path.split("/")
        if len(parts) < 2 or not parts[-1] or not parts[-2]:
            raise SMPDFormatError(f"{label}: row {i}: image path {path!r} is not <split>/<Uid>/<Pid>.jpg")
        uids.append(parts[-2])
        pids.append(parts[-1].rsplit(".", 1)[0])
    return uids, pids


def _check_alignment(file: MetadataFile, uids: list[str], pids: list[str]) -> None:
    """(Uid, Pid) of every row of ``file`` must equal the image path's: the files are aligned by position."""
    for field, expected, norm in (("Uid", uids, lambda v: str(v).strip()), ("Pid", pids, _pid)):
        got = [norm(v) for v in file.values(field, required=True)]
        if got != expected:
            i = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
            raise SMPDFormatError(f"{file.where(i, field)} is {got[i]!r} but the image path of row {i} says "
                                  f"{expected[i]!r} (rows misaligned or ids mismatched)")


def _check_unique(pids: list[str], label: str) -> None:
    first: dict[str, int] = {}
    for i, pid in enumerate(pids):
        j = first.setdefault(pid, i)
        if j != i:
            raise SMPDFormatError(f"{label}: duplicate Pid {pid} at rows {j} and {i}")


def _labels(src: SplitSource, n: int) -> np.ndarray:
    """The train labels, float64 (n,); error naming the line of a non-numeric value."""
    if LABEL_FILE not in src.names():
        raise SMPDFormatError(f"{src.where}: missing {LABEL_FILE} (the train split must be labelled; "
                              f"read with labels=False for inference on unlabelled posts)")
    label = src.label(LABEL_FILE)
    lines = _lines(src, LABEL_FILE)
    first_line = 1
    if len(lines) == n + 1 and not _is_float(lines[0]):
        lines, first_line = lines[1:], 2  # a caption line such as "Popularityscore"
    if len(lines) != n:
        raise SMPDFormatError(f"{label}: {len(lines)} labels but the image list has {n} rows (must be row-aligned)")
    values = np.empty(n)
    for i, text in enumerate(lines):
        if not _is_float(text) or not np.isfinite(float(text)):
            raise SMPDFormatError(f"{label}: line {i + first_line}: label {text!r} is not a finite number")
        values[i] = float(text)
    return values


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _image_status(root: Path, paths: list[str]) -> list[str]:
    status = []
    for path in paths:
        try:
            ok = (root / path).stat().st_size > 0
        except OSError:
            ok = False
        status.append(IMAGE_OK if ok else IMAGE_MISSING)
    return status


def to_schema(columns: dict[str, Any]) -> pd.DataFrame:
    """A DataFrame with exactly ``schema.COLUMNS``, in order, with the schema dtypes.

    Strings: pandas ``str`` dtype; missing values become ``""`` in ``STRING_COLUMNS`` and stay missing (NaN,
    ``isna()`` true) in ``NULLABLE_STRING_COLUMNS``;
    ints: int64; floats: float64; vector columns: object cells holding float32 (dim,) arrays or None.
    """
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"posts table lacks columns {missing}")
    frame = {}
    for col in COLUMNS:
        values = columns[col]
        if col in STRING_COLUMNS:
            frame[col] = pd.Series(values, dtype="str").fillna("")
        elif col in NULLABLE_STRING_COLUMNS:
            frame[col] = pd.Series(values, dtype="str")
        elif col in INT_COLUMNS:
            frame[col] = pd.Series(np.asarray(values, dtype=np.int64))
        elif col in FLOAT_COLUMNS:
            frame[col] = pd.Series(np.asarray(values, dtype=np.float64))
        else:
            frame[col] = pd.Series(values, dtype=object)
    return pd.DataFrame(frame)


def read_smpd(root: str | Path, splits: tuple[str, ...] = SPLITS, *, check_images: bool = True,
              labels: bool = True) -> pd.DataFrame:
    """Several splits as one posts table, rows in the order of ``splits`` (train first by default).

    A requested test split that is absent is skipped (a labelled-only directory); with ``labels=False`` (inference)
    any absent split is skipped; at least one split must be present. Pids must be unique across splits.
    """
    root = Path(root)
    frames = []
    for split in splits:
        try:
            frames.append(read_split(root, split, check_images=check_images, labels=labels))
        except SplitNotFoundError:
            if split == LABELLED_SPLIT and labels:
                raise
            log.info("%s: no %s split", root, split)
    if not frames:
        raise SMPDFormatError(f"{root}: no SMPD split found (looked for {', '.join(splits)})")
    posts = pd.concat(frames, ignore_index=True)
    dup = posts.post_id.duplicated(keep=False).to_numpy()
    if dup.any():
        first = posts.loc[dup, ["post_id", "split", "row"]]
        pid = first.post_id.iloc[0]
        where = ", ".join(f"{s} row {r}" for s, r in first.loc[first.post_id == pid, ["split", "row"]].to_numpy())
        raise SMPDFormatError(f"{root}: duplicate Pid {pid} across splits ({where}); {dup.sum()} rows involved")
    return posts


# ----------------------------------------------------------------------------- parquet round trip
def _vector_array(cells: pd.Series, dim: int) -> pa.Array:
    """Nullable list<float32> from object cells (float32 arrays or None), built from one flat buffer."""
    present = np.array([v is not None for v in cells], dtype=bool)
    lengths = np.where(present, dim, 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in cells if v is not None]) \
        if present.any() else np.empty(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(~present))


def write_posts(posts: pd.DataFrame, path: str | Path) -> None:
    """Write the posts table to parquet; vector columns as nullable list<float32>."""
    arrays = {}
    for col in COLUMNS:
        if col in VECTOR_COLUMNS:
            arrays[col] = _vector_array(posts[col], VECTOR_COLUMNS[col])
        else:
            arrays[col] = pa.array(posts[col], from_pandas=True)
    pq.write_table(pa.table(arrays), path)


def read_posts(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a table written by ``write_posts``: schema dtypes, vector cells float32 (dim,) arrays or None."""
    table = pq.read_table(path, columns=columns)
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if name in VECTOR_COLUMNS:
            lists = col.combine_chunks()
            matrix = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            matrix = matrix.reshape(-1, VECTOR_COLUMNS[name])
            valid = lists.is_valid().to_numpy(zero_copy_only=False)
            cells: list[np.ndarray | None] = [None] * len(lists)
            for j, i in enumerate(np.flatnonzero(valid)):
                cells[i] = matrix[j]
            out[name] = pd.Series(cells, dtype=object)
        elif name in STRING_COLUMNS or name in NULLABLE_STRING_COLUMNS:
            out[name] = col.to_pandas().astype("str")
        else:
            out[name] = col.to_pandas()
    return pd.DataFrame(out)


def vector_matrix(posts: pd.DataFrame, column: str) -> np.ndarray:
    """(n, dim) float32 matrix of a vector column; rows without a vector are NaN."""
    out = np.full((len(posts), VECTOR_COLUMNS[column]), np.nan, dtype=np.float32)
    present = np.flatnonzero([v is not None for v in posts[column]])
    if len(present):
        out[present] = np.stack([posts[column].iloc[i] for i in present])
    return out
