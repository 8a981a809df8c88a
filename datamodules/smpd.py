"""Reader for the real SMPD-Image release (as the SMP Challenge distributes it): raw split folders or zips -> the
posts table.

    posts = read_smpd("/data/SMPD")          # train rows then test rows, columns of datamodules.schema
    posts.attrs["repairs"]                   # {column: cells repaired}, see "Bad values" below

Accepted layouts for a split (first match wins): ``<root>/{split}_allmetadata_json/``, the zips
``<root>/{split}_allmetadata_json.zip`` or ``<root>/SMP_image_{split}_metadata.zip``, ``<root>/{split}/`` holding the
metadata files, or the files directly in ``<root>``. Images are at ``<root>/{split}/<Uid>/<Pid>.jpg`` (the paths of
``{split}_img_filepath.txt``). Both file-name sets (2019-2025 and 2020) and both user-data variants are read.

Rows of every file of a split are aligned by position; (Uid, Pid) is verified across files and against the image path.
Errors name the file, the row and the field (``SMPDFormatError``). Missing images, empty titles/tags, missing
coordinates and null user fields are normal data: they are recorded, never fatal.

Confinement: every image path must resolve inside the data root, symlinks included (``datamodules.confine``).
A path that is absolute, climbs out with ``..`` or follows a symlink out of the root gets the image status
``outside_root`` (counted like a missing image); it is never opened and nothing outside the root is stat'ed, so
the status does not tell whether a file exists there.

Archives: only the known metadata file names of the split are looked up in a zip. Two members that could be the
same metadata file (the same name in two folders) or metadata members spread over several folders are refused; two
aliases of one file (e.g. ``_text.json`` and ``_tags.json``) are refused in folders and zips alike. Each file or
member may hold at most ``max_member_bytes`` bytes (default ``MAX_MEMBER_BYTES``); a damaged member (CRC error,
broken stream, encrypted, unsupported) is an error naming the archive and the member.

Bad values, per field. A *repair* is counted per cell in ``posts.attrs["repairs"]`` (``{column: count}``, which the
prepare stage writes into its manifest as ``repaired_<column>``) and logged in one warning::

    field (file)                      bad value                                          outcome
    --------------------------------  -------------------------------------------------  ------------------------
    Postdate (temporalspatial)        missing, not a number, non-finite (Infinity,       error naming file, row
                                      1e400), outside the postdate window (default       and field
                                      [2004-01-01, 2100-01-01) UTC; config key
                                      data.postdate_range)
    Latitude, Longitude               not a number, non-finite, outside [-90, 90] /      repair: no geotag (both
      (temporalspatial)               [-180, 180]                                        coordinates NaN)
    Geoaccuracy (temporalspatial)     not a number, non-finite, negative, above 16,      repair: 0 (no geotag,
                                      not integral                                       coordinates NaN)
    Ispublic (additional); photo_     not a number, non-finite                           repair: NaN
      count, ispro, canbuypro (user)
    photo_firstdate, photo_first-     not a number or date, non-finite, outside          repair: NaN
      datetaken (user)                [1900-01-01, 2100-01-01) UTC
    user_/location_description        a vector holding a non-finite value                repair: None
      (user, variant A)               a vector of the wrong length                       error (file, row, field)
    every text field (title, tags,    a lone UTF-16 surrogate (``\\ud800`` in the         repair: U+FFFD
      categories, user texts, ...)    JSON text)
    label (train_label.txt)           not a number, non-finite                           error naming file, line

Null-like values (``null``, ``""``, ``"None"``, ``"nan"``; ``"0"`` for a coordinate) are missing data, not repairs.

Speed: parsing the 399/400-float description vectors dominates (its rate: ``benchmarks/README.md``).
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import re
import stat
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from popstack.datamodules.atomic import atomic_path
from popstack.datamodules.confine import ConfinedRoot, real_root, resolve_inside
from popstack.datamodules.schema import (
    COLUMNS,
    FLOAT_COLUMNS,
    IMAGE_MISSING,
    IMAGE_OK,
    IMAGE_OUTSIDE,
    INT_COLUMNS,
    SPLITS,
    VECTOR_COLUMNS,
    extra_columns,
)

log = logging.getLogger("popstack")


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
    "label": ("label.txt",),
}
RECORD_FILES: tuple[str, ...] = ("category", "text", "temporalspatial", "additional", "user")
VECTOR_MIN_COMMAS = 50  # a description with this many commas and only numbers is a vector (variant A)
#: Bytes one metadata file or zip member may hold. SMPD's largest file, the variant-A train user data, is about
#: 1.3-2.2 GB (4.3-7.2 kB per post of 399 + 400 float strings); the cap stops a zip bomb well before memory runs out.
MAX_MEMBER_BYTES = 4 * 2**30
#: Default plausible postdate window [2004-01-01, 2100-01-01) UTC (Flickr opened in February 2004); the pipeline
#: passes ``data.postdate_range`` (``postdate_window``), which a user widens for an archive of older posts.
POSTDATE_RANGE = (1_072_915_200, 4_102_444_800)
EPOCH_RANGE = (-2_208_988_800, 4_102_444_800)  # [1900-01-01, 2100-01-01) UTC, user dates
#: What the zipfile module raises for a damaged archive or member (CRC, broken stream, unsupported or encrypted).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError, ValueError)
GEOACCURACY_MAX = 16  # Flickr accuracy levels 1 (world) .. 16 (street); 0 = no geotag
#: Columns whose bad values are repaired (see the module docstring); ``posts.attrs["repairs"]`` has one count each.
REPAIRABLE: tuple[str, ...] = (
    "latitude", "longitude", "geoaccuracy", "ispublic", "photo_firstdate", "photo_firstdatetaken", "photo_count",
    "ispro", "canbuypro", "user_vector", "location_vector", "category", "subcategory", "concept", "title",
    "alltags", "mediatype", "pathalias", "mediastatus", "timezone_offset", "timezone_id", "user_text",
    "location_text",
)


# ----------------------------------------------------------------------------- file access
@dataclass
class SplitSource:
    """Where a split's metadata files live: a directory or a zip archive."""

    split: str
    where: Path
    zip_members: dict[str, str] | None = None  # file name -> member name, for zips
    max_bytes: int = MAX_MEMBER_BYTES
    root: Path | None = None  # the data root, resolved: a folder's files are confined to it

    def _file(self, name: str) -> Path | None:
        """The real path of file ``name`` of a folder source, confined to the data root (None: not a file)."""
        path = self.where / name
        real = _confined(self.root, path) if self.root is not None else path
        return real if real is not None and real.is_file() else None

    def names(self) -> list[str]:
        if self.zip_members is not None:
            return list(self.zip_members)
        return sorted(p.name for p in self.where.iterdir() if self._listed(p.name))

    def _listed(self, name: str) -> bool:
        """A file of the folder, or a symlink leading outside the root (refused by name when it is read)."""
        try:
            return self._file(name) is not None
        except SMPDFormatError:
            return True

    def label(self, name: str) -> str:
        return f"{self.where}:{self.zip_members[name]}" if self.zip_members is not None else str(self.where / name)

    def read_bytes(self, name: str) -> bytes:
        """The bytes of one metadata file; at most ``max_bytes``; zip damage becomes ``SMPDFormatError``."""
        if self.zip_members is None:
            path = self._file(name) or self.where / name
            try:
                size = path.stat().st_size
                if size > self.max_bytes:
                    raise SMPDFormatError(self._too_big(name, size))
                return path.read_bytes()
            except OSError as err:
                raise SMPDFormatError(f"{path}: cannot be read ({err})") from err
        member = self.zip_members[name]
        try:
            with zipfile.ZipFile(self.where) as zf:
                info = zf.getinfo(member)
                if info.file_size > self.max_bytes:
                    raise SMPDFormatError(self._too_big(name, info.file_size))
                with zf.open(info) as fh:
                    data = fh.read(self.max_bytes + 1)  # reads to the end, so the CRC is checked
        except SMPDFormatError:
            raise
        except _ZIP_ERRORS as err:
            raise SMPDFormatError(f"{self.where}: member {member}: corrupt or unreadable ({_short(err, 200)})") from err
        if len(data) > self.max_bytes:
            raise SMPDFormatError(self._too_big(name, len(data)))
        return data

    def _too_big(self, name: str, size: int) -> str:
        return (f"{self.label(name)}: {size} bytes, more than the cap of {self.max_bytes} bytes per metadata file "
                f"(max_member_bytes)")

    def find(self, logical: str, required: bool = True) -> str | None:
        """The file name of ``logical`` (one of ``FILE_ALIASES``); two present aliases are ambiguous."""
        tried = [f"{self.split}_{suffix}" for suffix in FILE_ALIASES[logical]]
        present = set(self.names())
        found = [name for name in tried if name in present]
        if len(found) > 1:
            raise SMPDFormatError(
                f"{self.where}: {' and '.join(found)} are both candidates for '{logical}'; keep one of them"
            )
        if found:
            return found[0]
        if required:
            raise SMPDFormatError(f"{self.where}: missing file for '{logical}' (tried {', '.join(tried)})")
        return None


def _confined(root_real: Path, path: Path) -> Path | None:
    """``path`` (under ``root_real``) with its symlinks resolved inside the root; ``SMPDFormatError`` when a symlink
    leads outside it (never followed); None when nothing is there."""
    rel = path.relative_to(root_real).as_posix()
    real = resolve_inside(root_real, rel) if rel != "." else root_real
    if real is None:
        raise SMPDFormatError(f"{path}: a symlink leading outside the data root {root_real}; metadata is read "
                              f"only from inside data.root (copy the file or folder into it)")
    try:
        real.lstat()
    except OSError:
        return None
    return real


def find_split(root: Path, split: str, max_bytes: int = MAX_MEMBER_BYTES) -> SplitSource:
    """Locate the metadata of ``split`` under ``root`` (folder, zip, or files directly in root); symlinks are
    followed only inside ``root`` (``datamodules.confine``)."""
    if split not in SPLITS:
        raise SMPDFormatError(f"unknown split {split!r}; SMPD splits are {', '.join(SPLITS)}")
    if not root.is_dir():
        raise SMPDFormatError(f"{root}: SMPD root directory not found")
    base = real_root(root)
    marker = f"{split}_img_filepath.txt"
    for name in (f"{split}_allmetadata_json", f"{split}_all_json", split, "."):
        cand = _confined(base, base / name)
        if cand is None or not cand.is_dir():
            continue
        lists = [_confined(base, cand / f"{split}_{s}") for s in FILE_ALIASES["img_filepath"]]
        if any(p is not None and p.is_file() for p in lists):
            return SplitSource(split, cand, max_bytes=max_bytes, root=base)
    for zname in (f"{split}_allmetadata_json.zip", f"SMP_image_{split}_metadata.zip"):
        zpath = _confined(base, base / zname)
        if zpath is not None and zpath.is_file():
            return SplitSource(split, zpath, _zip_members(zpath, split), max_bytes)
    raise SMPDFormatError(
        f"{root}: no metadata for split '{split}' (looked for {marker} in {split}_allmetadata_json/, {split}/, "
        f"the root, and {split}_allmetadata_json.zip)"
    )


def _zip_members(zpath: Path, split: str) -> dict[str, str]:
    """Metadata file name -> member name; refuses two candidates for one name and members in several folders."""
    known = {f"{split}_{suffix}" for suffixes in FILE_ALIASES.values() for suffix in suffixes}
    try:
        with zipfile.ZipFile(zpath) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/")]
    except _ZIP_ERRORS as err:
        raise SMPDFormatError(f"{zpath}: not a readable zip ({_short(err, 200)})") from err
    found: dict[str, list[str]] = {}
    for member in members:
        name = PurePosixPath(member.replace("\\", "/")).name
        if name in known:
            found.setdefault(name, []).append(member)
    for name, candidates in found.items():
        if len(candidates) > 1:
            raise SMPDFormatError(
                f"{zpath}: members {', '.join(candidates)} are all candidates for {name}; refusing to guess"
            )
    folders = {str(PurePosixPath(m[0].replace("\\", "/")).parent): m[0] for m in found.values()}
    if len(folders) > 1:
        raise SMPDFormatError(
            f"{zpath}: unexpected members: metadata files in several folders ({', '.join(sorted(folders.values()))}); "
            f"expected one folder"
        )
    return {name: candidates[0] for name, candidates in found.items()}


def _load_json(src: SplitSource, name: str) -> Any:
    raw = src.read_bytes(name)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise SMPDFormatError(
            f"{src.label(name)}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})"
        ) from err
    except (ValueError, RecursionError) as err:  # bad UTF-8, an integer of over 4300 digits, deep nesting
        raise SMPDFormatError(f"{src.label(name)}: invalid JSON ({_short(err)})") from err


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


_NEWLINE = re.compile(r"\r\n|\r|\n")


def _lines(src: SplitSource, name: str) -> list[tuple[int, str]]:
    """(1-based line number in the file, stripped text) of every non-blank line."""
    try:
        text = src.read_bytes(name).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SMPDFormatError(f"{src.label(name)}: not UTF-8 text (byte {err.start})") from err
    # Lines end at \n, \r\n or \r only: str.splitlines would also split at U+2028, U+0085 ... inside a Pid
    return [(k, ln.strip()) for k, ln in enumerate(_NEWLINE.split(text), start=1) if ln.strip()]


@dataclass
class _Records:
    """The rows of one record file of a split, with the label used in error messages."""

    label: str
    rows: list[dict[str, Any]]

    def where(self, i: int, field: str) -> str:
        return f"{self.label}: row {i}: field '{field}'"

    def column(self, name: str, aliases: tuple[str, ...] = (), required: bool = False) -> list[Any]:
        """The value of ``name`` (or the first alias present) in every row; None where absent unless required."""
        out = []
        for i, rec in enumerate(self.rows):
            for candidate in (name, *aliases):
                if candidate in rec:
                    out.append(rec[candidate])
                    break
            else:
                if required:
                    raise SMPDFormatError(f"{self.label}: row {i}: field '{name}' missing")
                out.append(None)
        return out


@dataclass
class _RawSplit:
    """A located split: its source, the image paths (one per post) and the row-aligned record files."""

    src: SplitSource
    image_list: str  # label of the image-path file, for messages
    paths: list[str]
    files: dict[str, _Records]


# ----------------------------------------------------------------------------- value parsing
class _BadValue(Exception):
    """A present value that is not valid for its field: the caller repairs it (and counts the repair)."""


def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (
        isinstance(v, str) and v.strip() in ("", "None", "nan", "NaN", "null"))


def _number(v: Any) -> float:
    """A finite float; NaN when null; ``_BadValue`` when not a number or not finite."""
    if _is_null(v):
        return np.nan
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError) as err:
        raise _BadValue from err
    if not math.isfinite(x):
        raise _BadValue
    return x


def _coordinate(limit: float) -> Callable[[Any], float]:
    """Parser of a latitude (``limit`` 90) or longitude (180): NaN when null or 0 (no geotag)."""
    def parse(v: Any) -> float:
        x = _number(v)
        if x == 0.0:
            return np.nan
        if abs(x) > limit:
            raise _BadValue
        return x
    return parse


def _geoaccuracy(v: Any) -> int:
    x = _number(v)
    if np.isnan(x):
        return 0
    if not x.is_integer() or not 0 <= x <= GEOACCURACY_MAX:
        raise _BadValue
    return int(x)


def _epoch(v: Any) -> float:
    """Epoch seconds from a number, a numeric string, or a ``YYYY-MM-DD HH:MM:SS`` string (UTC); NaN if null."""
    if _is_null(v):
        return np.nan
    if isinstance(v, str) and not _is_number(v):
        s = v.strip()
        for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
            try:
                v = calendar.timegm(time.strptime(s, fmt))
                break
            except ValueError:
                continue
    x = _number(v)
    if not EPOCH_RANGE[0] <= x < EPOCH_RANGE[1]:
        raise _BadValue
    return x


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(s: str) -> str:
    """``s`` if it encodes as UTF-8; ``_BadValue`` when it holds a lone surrogate."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _BadValue from err
    return s


def _repaired(values: list[Any], parse: Callable[[Any], Any], repair: Callable[[Any], Any], fix: Counter,
              column: str) -> list[Any]:
    """``parse`` every value; a ``_BadValue`` becomes ``repair(value)`` and one more ``fix[column]``."""
    out = []
    for v in values:
        try:
            out.append(parse(v))
        except _BadValue:
            out.append(repair(v))
            fix[column] += 1
    return out


def _clean(strings: list[str | None], fix: Counter, column: str) -> list[str | None]:
    """Text cells with every lone surrogate replaced by U+FFFD (one repair counted per cell)."""
    return _repaired(strings, lambda s: s if s is None else _valid_text(s),
                     lambda s: _SURROGATE.sub("\ufffd", s), fix, column)


def _scalar_text(v: Any) -> str | None:
    """A text cell: a string, or a number written as text; None when null; ``_BadValue`` for anything else (an
    object, a list, a boolean), which must not become a class named ``"{'a': 1}"`` or ``'True'``."""
    if _is_null(v):
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
    raise _BadValue


def _class_name(v: Any) -> str:
    """A category/subcategory/concept: text or a number written as text; ``_BadValue`` for null or another type
    (repaired to ``""``, one class for every unknown, never ``'None'``)."""
    name = _scalar_text(v)
    if name is None:
        raise _BadValue
    return name


def _or_empty(values: list[Any], fix: Counter, column: str) -> list[str]:
    """Text cells, null as ``""``; a value of the wrong type becomes ``""`` (one repair counted)."""
    return [v or "" for v in _repaired(values, _scalar_text, lambda v: None, fix, column)]


def _or_none(values: list[Any], fix: Counter, column: str) -> list[str | None]:
    """Text cells, null as None; a value of the wrong type becomes None (one repair counted)."""
    return _repaired(values, _scalar_text, lambda v: None, fix, column)


def _floats(values: list[Any], parse: Callable[[Any], float], fix: Counter, column: str) -> list[float]:
    return _repaired(values, parse, lambda v: np.nan, fix, column)


def _description(v: Any, dim: int, where: Callable[[], str]) -> tuple[np.ndarray | None, str | None]:
    """(vector, text) of a user/location description: variant A float list, variant B free text, or null.

    ``_BadValue`` for a vector holding a non-finite value; ``SMPDFormatError`` for a vector of the wrong length.
    """
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
        if not np.isfinite(vec).all():
            raise _BadValue
        return vec, None
    return None, s


def _image_path(line: str) -> str:
    return line.strip().strip('"').strip("'").replace("\\", "/")


def _pid(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _short(v: Any, limit: int = 60) -> str:
    """repr of a value for an error message, cut to ``limit`` characters."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


# ----------------------------------------------------------------------------- the reader, step by step
def _locate(root: Path, split: str, max_bytes: int) -> _RawSplit:
    """Find the split's files, read the image list and the five record files, and check they are row-aligned."""
    src = find_split(root, split, max_bytes)
    img_name = src.find("img_filepath")
    paths = [_image_path(ln) for _, ln in _lines(src, img_name)]
    files = {key: _Records(src.label(name), _records(src, name))
             for key, name in ((k, src.find(k)) for k in RECORD_FILES)}
    for rec in files.values():
        if len(rec.rows) != len(paths):
            raise SMPDFormatError(
                f"{rec.label}: {len(rec.rows)} rows but {src.label(img_name)} lists {len(paths)} "
                f"images (files must be row-aligned)"
            )
    return _RawSplit(src, src.label(img_name), paths, files)


def _align(raw: _RawSplit) -> tuple[list[str], list[str]]:
    """(uids, pids) from the image paths, verified against (Uid, Pid) of every record file; Pids unique."""
    uids, pids = [], []
    for i, path in enumerate(raw.paths):
        parts = path.split("/")
        if len(parts) < 2:
            raise SMPDFormatError(f"{raw.image_list}: row {i}: image path {path!r} is not <split>/<Uid>/<Pid>.jpg")
        uid, pid = parts[-2], Path(parts[-1]).stem
        for rec in raw.files.values():
            row = rec.rows[i]
            for field, expected in (("Uid", uid), ("Pid", pid)):
                if field not in row:
                    raise SMPDFormatError(f"{rec.label}: row {i}: field '{field}' missing")
                got = _pid(row[field]) if field == "Pid" else str(row[field]).strip()
                if got != expected:
                    raise SMPDFormatError(
                        f"{rec.label}: row {i}: field '{field}' is {_short(got)} but the image path says "
                        f"{expected!r} (rows misaligned?)"
                    )
        uids.append(uid)
        pids.append(pid)
    seen: dict[str, int] = {}
    for i, pid in enumerate(pids):
        if pid in seen:
            raise SMPDFormatError(f"{raw.image_list}: duplicate Pid {pid} at rows {seen[pid]} and {i}")
        seen[pid] = i
    return uids, pids


def _category_columns(f: _Records, fix: Counter) -> dict[str, list]:
    return {col: _clean(_repaired(f.column(field, required=True), _class_name, lambda v: "", fix, col), fix, col)
            for col, field in (("category", "Category"), ("subcategory", "Subcategory"), ("concept", "Concept"))}


def _text_columns(f: _Records, fix: Counter) -> dict[str, list]:
    return {
        "title": _clean(_or_empty(f.column("Title", ("Tile",)), fix, "title"), fix, "title"),
        "alltags": _clean(_or_empty(f.column("Alltags"), fix, "alltags"), fix, "alltags"),
        "mediatype": _clean(_or_empty(f.column("Mediatype"), fix, "mediatype"), fix, "mediatype"),
    }


def postdate_window(dates: Any) -> tuple[int, int]:
    """``[first, end]`` as two ISO dates (``"2004-01-01"``, UTC) -> epoch seconds ``(lo, hi)``, posts accepted in
    [lo, hi). ``ValueError`` names what is wrong (not two dates, unparsable, not increasing)."""
    if dates is None or isinstance(dates, str) or len(dates) != 2:
        raise ValueError(f"postdate range must be two dates [first, end], got {dates!r}")
    try:
        lo, hi = (int(pd.Timestamp(str(d), tz="UTC").timestamp()) for d in dates)
    except (ValueError, TypeError) as err:
        raise ValueError(f"postdate range {list(dates)!r}: {err}") from err
    if lo >= hi:
        raise ValueError(f"postdate range {list(dates)!r}: the first date must be before the end date")
    return lo, hi


def _utc_day(seconds: int) -> str:
    return pd.Timestamp(seconds, unit="s", tz="UTC").strftime("%Y-%m-%d")


def _postdate(f: _Records, window: tuple[int, int] = POSTDATE_RANGE) -> np.ndarray:
    """Postdate as int64 epoch seconds; any bad value is an error (there is nothing to repair it with).
    ``window``: accepted [lo, hi) epoch seconds."""
    lo, hi = window
    out = np.empty(len(f.rows), dtype=np.int64)
    for i, v in enumerate(f.column("Postdate", required=True)):
        try:
            x = float(v)
        except (TypeError, ValueError, OverflowError) as err:
            raise SMPDFormatError(f"{f.where(i, 'Postdate')} is {_short(v)}, expected epoch seconds") from err
        if not lo <= x < hi:  # NaN and infinities fail too
            raise SMPDFormatError(
                f"{f.where(i, 'Postdate')} is {_short(v)}, outside the plausible range {_utc_day(lo)} .. "
                f"{_utc_day(hi)} UTC ({lo} .. {hi} epoch seconds; widen it with data.postdate_range)"
            )
        out[i] = int(x)
    return out


def _temporalspatial_columns(f: _Records, fix: Counter, window: tuple[int, int]) -> dict[str, Any]:
    """Postdate, and the geotag: coordinates NaN unless both are valid and geoaccuracy > 0."""
    lat = np.array(_floats(f.column("Latitude", required=True), _coordinate(90.0), fix, "latitude"))
    lon = np.array(_floats(f.column("Longitude", required=True), _coordinate(180.0), fix, "longitude"))
    acc = np.array(_repaired(f.column("Geoaccuracy", required=True), _geoaccuracy, lambda v: 0, fix,
                             "geoaccuracy"), dtype=np.int64)
    no_geo = np.isnan(lat) | np.isnan(lon) | (acc == 0)
    lat[no_geo], lon[no_geo] = np.nan, np.nan
    return {"postdate": _postdate(f, window), "latitude": lat, "longitude": lon, "geoaccuracy": acc}


def _additional_columns(f: _Records, fix: Counter) -> dict[str, list]:
    return {
        "pathalias": _clean(_or_none(f.column("Pathalias"), fix, "pathalias"), fix, "pathalias"),
        "ispublic": _floats(f.column("Ispublic"), _number, fix, "ispublic"),
        "mediastatus": _clean(_or_empty(f.column("Mediastatus"), fix, "mediastatus"), fix, "mediastatus"),
    }


def _descriptions(f: _Records, field: str, column: str, fix: Counter) -> tuple[list, list]:
    """(vectors, texts) of one description field; a vector with a non-finite value becomes None (counted)."""
    dim = VECTOR_COLUMNS[column]
    vectors, texts = [], []
    with np.errstate(over="ignore"):  # "1e39" -> inf in float32 is a bad value, counted below, not a warning
        for i, v in enumerate(f.column(field)):
            try:
                vec, text = _description(v, dim, lambda i=i: f.where(i, field))
            except _BadValue:
                vec, text = None, None
                fix[column] += 1
            vectors.append(vec)
            texts.append(text)
    return vectors, texts


def _user_columns(f: _Records, fix: Counter) -> dict[str, list]:
    user_vec, user_txt = _descriptions(f, "user_description", "user_vector", fix)
    loc_vec, loc_txt = _descriptions(f, "location_description", "location_vector", fix)
    return {
        "photo_firstdate": _floats(f.column("photo_firstdate"), _epoch, fix, "photo_firstdate"),
        "photo_firstdatetaken": _floats(f.column("photo_firstdatetaken"), _epoch, fix, "photo_firstdatetaken"),
        "photo_count": _floats(f.column("photo_count"), _number, fix, "photo_count"),
        "ispro": _floats(f.column("ispro"), _number, fix, "ispro"),
        "canbuypro": _floats(f.column("canbuypro"), _number, fix, "canbuypro"),
        "timezone_offset": _clean(_or_none(f.column("timezone_offset"), fix, "timezone_offset"), fix,
                                  "timezone_offset"),
        "timezone_id": _clean(_or_none(f.column("timezone_id", ("timezone_timezone_id",)), fix, "timezone_id"), fix,
                              "timezone_id"),
        "user_vector": user_vec,
        "user_text": _clean(user_txt, fix, "user_text"),
        "location_vector": loc_vec,
        "location_text": _clean(loc_txt, fix, "location_text"),
    }


def _labels(src: SplitSource, n: int) -> np.ndarray:
    """The ``n`` train labels (float64); a caption first line is skipped; errors name the file's line number."""
    name = src.find("label", required=False)
    if name is None:
        raise SMPDFormatError(f"{src.where}: missing file train_label.txt (the train split must be labelled)")
    lines = _lines(src, name)
    if lines and not _is_number(lines[0][1]) and len(lines) == n + 1:
        lines = lines[1:]  # a caption line such as "Popularityscore"
    if len(lines) != n:
        raise SMPDFormatError(f"{src.label(name)}: {len(lines)} labels but {n} images (must be row-aligned)")
    values = np.full(n, np.nan)
    for i, (lineno, ln) in enumerate(lines):
        try:
            values[i] = float(ln)
        except ValueError as err:
            raise SMPDFormatError(f"{src.label(name)}: line {lineno}: label {_short(ln)} is not a number") from err
        if not np.isfinite(values[i]):
            raise SMPDFormatError(f"{src.label(name)}: line {lineno}: label {_short(ln)} is not finite")
    return values


def image_statuses(root: Path, paths: list[str], check_images: bool) -> list[str]:
    """Per path (relative to ``root``): ``outside_root`` when it leaves ``root`` (never opened); else, with
    ``check_images``, ``ok`` for a non-empty regular file and ``missing`` otherwise; without it ``ok``."""
    confined = ConfinedRoot(root)
    status = []
    for path in paths:
        real = confined.resolve(path)
        if real is None:
            status.append(IMAGE_OUTSIDE)
        elif not check_images:
            status.append(IMAGE_OK)
        else:
            try:
                st = real.lstat()  # no component of ``real`` is a symlink
                ok = stat.S_ISREG(st.st_mode) and st.st_size > 0
            except OSError:
                ok = False
            status.append(IMAGE_OK if ok else IMAGE_MISSING)
    return status


def _image_status(root: Path, raw: _RawSplit, check_images: bool) -> list[str]:
    """``image_statuses`` of a split's paths, with one warning naming the paths that lead outside the data root."""
    confined = ConfinedRoot(root)
    status = image_statuses(root, raw.paths, check_images)
    outside = [i for i, s in enumerate(status) if s == IMAGE_OUTSIDE]
    if outside:
        log.warning("%s: %d image paths lead outside the data root %s (e.g. row %d: %s); they are treated as "
                    "missing images (status '%s') and never read", raw.image_list, len(outside), confined.root,
                    outside[0], _short(raw.paths[outside[0]]), IMAGE_OUTSIDE)
    return status


def read_split(root: str | Path, split: str, *, check_images: bool = True, labels: bool = True,
               max_member_bytes: int = MAX_MEMBER_BYTES,
               postdate_range: tuple[int, int] = POSTDATE_RANGE) -> pd.DataFrame:
    """Read one split into the posts table (``datamodules.schema`` columns); see the module docstring.

    ``postdate_range``: accepted postdates, [lo, hi) epoch seconds (``postdate_window`` turns dates into it).
    ``labels=False`` reads no label file at all (inference on new posts): every label is NaN.
    ``posts.attrs["repairs"]``: {column: number of repaired cells} for every column of ``REPAIRABLE``.
    """
    root = Path(root)
    raw = _locate(root, split, max_member_bytes)
    uids, pids = _align(raw)
    n = len(pids)
    fix: Counter = Counter()
    posts = pd.DataFrame({
        "post_id": pids,
        "uid": uids,
        "split": split,
        "row": np.arange(n, dtype=np.int64),
        "image_relpath": raw.paths,
        "image_status": _image_status(root, raw, check_images),
        **_category_columns(raw.files["category"], fix),
        **_text_columns(raw.files["text"], fix),
        **_temporalspatial_columns(raw.files["temporalspatial"], fix, postdate_range),
        **_additional_columns(raw.files["additional"], fix),
        **_user_columns(raw.files["user"], fix),
        # test splits: a label file, if any, is ignored (test labels were never released)
        "label": _labels(raw.src, n) if split == "train" and labels else np.full(n, np.nan),
    })
    posts = _typed(posts)
    posts.attrs["repairs"] = {col: int(fix[col]) for col in REPAIRABLE}
    return posts


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
              labels: bool = True, max_member_bytes: int = MAX_MEMBER_BYTES,
              postdate_range: tuple[int, int] = POSTDATE_RANGE) -> pd.DataFrame:
    """Read several splits (train rows first) into one posts table; Pids must be unique across splits.

    A split listed in ``splits`` but absent from ``root`` is an error except for ``test``, which may be missing
    (a labelled-only directory); with ``labels=False`` (inference) any absent split is skipped, but at least one
    must be there. An unknown split name is always an error. ``posts.attrs["repairs"]`` sums the splits' repair
    counts (one warning is logged when any value was repaired).
    """
    root = Path(root)
    frames = []
    for split in splits:
        try:
            frames.append(read_split(root, split, check_images=check_images, labels=labels,
                                     max_member_bytes=max_member_bytes, postdate_range=postdate_range))
        except SMPDFormatError as err:
            if (split == "test" or not labels) and "no metadata for split" in str(err):
                continue
            raise
    if not frames:
        raise SMPDFormatError(f"{root}: no SMPD split found (looked for {', '.join(splits)})")
    repairs = {col: sum(f.attrs["repairs"][col] for f in frames) for col in REPAIRABLE}
    posts = pd.concat(frames, ignore_index=True)
    posts.attrs["repairs"] = repairs
    dup = posts.post_id.duplicated(keep=False)
    if dup.any():
        rows = posts.loc[dup, ["split", "row", "post_id"]].head(4).to_dict("records")
        raise SMPDFormatError(f"{root}: duplicate Pid across splits: {rows}")
    if any(repairs.values()):
        log.warning("%s: bad raw values repaired (see datamodules.smpd): %s", root,
                    ", ".join(f"{col}={n}" for col, n in repairs.items() if n))
    return posts


# ----------------------------------------------------------------------------- parquet round trip
def write_posts(posts: pd.DataFrame, path: str | Path) -> None:
    """Write the posts table to parquet (atomically), keeping the vector columns as nullable list<float32> and the
    extra columns (``datamodules.schema.extra_columns``) after the schema's."""
    arrays = {}
    for col in (*COLUMNS, *extra_columns(posts.columns)):
        if col in VECTOR_COLUMNS:
            arrays[col] = pa.array([None if v is None else np.asarray(v, dtype=np.float32) for v in posts[col]],
                                   type=pa.list_(pa.float32()))
        else:
            arrays[col] = pa.array(posts[col].tolist() if posts[col].dtype == object else posts[col].to_numpy(),
                                   from_pandas=True)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp)


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
