"""Seeded corruption fuzzing of the SMPD reader.

Property: for any corruption of a small valid SMPD directory, ``read_smpd`` either returns a table with one row per
listed image (valid values only: the repairs of ``datamodules.smpd`` hold, and it writes to parquet) or raises
``SMPDFormatError`` whose message names a path under the data root; never another exception.

A seeded generator (no hypothesis: the test runs in the project venv as is, and every failure is reproducible from
its case number) applies 1-3 random corruptions per case (every other case: hostile JSON values only, so that
many cases still make a table and the repairs are exercised): hostile JSON values (``Infinity``, ``1e400``, a
5000-digit integer, lone surrogates, wrong types, path traversal, deep nesting), structural edits (dropped,
duplicated, swapped records or fields), byte flips, truncation, inserted bytes (invalid UTF-8, NUL), image-list and
label-line edits, deleted files, alias duplicates, and zipped metadata with corrupted or duplicated members.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from popstack.datamodules.schema import COLUMNS, FLOAT_COLUMNS
from popstack.datamodules.smpd import POSTDATE_RANGE, SMPDFormatError, read_smpd, write_posts
from popstack.datamodules.synthetic import generate

N_CASES = 150
SEED = 16


class Raw(str):
    """A JSON value written verbatim (``1e400``, a 5000-digit integer, deep nesting)."""


HOSTILE = [
    None, "", "None", "0", "-0", "abc", "Infinity", "-Infinity", "NaN", math.inf, -math.inf, math.nan,
    Raw("1e400"), Raw("-1e400"), Raw("1" + "0" * 5000), 10**30, -1, -1e308, True, False, [], {}, [1, 2],
    {"a": 1}, "\ud800", "x\udfffy", "../../etc/passwd", "/etc/passwd", "é", "1.5", "12.5e3", " 42 ", "9" * 50,
    "a,b" * 60, ",".join(["inf"] * 399), ",".join(["1"] * 400), "2015-06-01 12:00:00", "0000-00-00 00:00:00",
    Raw("[" * 5000 + "]" * 5000),
]
HOSTILE_LINES = ["", "../outside/u@N1/1.jpg", "/etc/u@N1/1.jpg", "nan", "1e400", "abc", '"train/a/b.jpg"',
                 "train/x", "\t", "a/b/c/d.jpg", "C:\\x\\1.jpg", "-5", "1_0"]
INSERTS = [b"\xff", b"\x00", b"\xed\xa0\x80", b"\n\n", b'"', b"{", b"]", b",", b"\r", "é".encode()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid root (6 train + 3 test posts, images included) and its metadata files as bytes."""
    root = tmp_path_factory.mktemp("fuzz")
    generate(root, n_train=6, n_test=3, seed=5, n_subcategories=3, user_variant="A", naming="2025", image_mess=False)
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*_allmetadata_json/*"))}
    return root, files


def _dumps(value) -> bytes:
    raws: list[str] = []

    def hook(v):
        if isinstance(v, Raw):
            raws.append(str(v))
            return f"@RAW{len(raws) - 1}@"
        raise TypeError(type(v))

    text = json.dumps(value, default=hook)
    for k in range(len(raws)):  # Raw is a str subclass: json.dumps writes it as a string; unquote it here
        text = text.replace(f'"@RAW{k}@"', raws[k])
    return text.encode()


def _pick_json(rng: random.Random, files: dict[str, bytes]):
    """(name, parsed content) of a random JSON file that still parses, or (None, None)."""
    names = [n for n in files if n.endswith(".json")]
    rng.shuffle(names)
    for name in names:
        try:
            return name, json.loads(files[name])
        except ValueError:
            continue
    return None, None


def json_value(rng: random.Random, files: dict[str, bytes]) -> str:
    name, data = _pick_json(rng, files)
    if name is None:
        return "value -"
    value = rng.choice(HOSTILE)
    if isinstance(data, list) and data:
        rec = rng.choice(data)
        key = rng.choice(list(rec) + ["Tile"])
        rec[key] = "@V@"
    elif isinstance(data, dict) and data:
        col = rng.choice(list(data))
        data[col][rng.choice(list(data[col]))] = "@V@"
    files[name] = _dumps(data).replace(b'"@V@"', _dumps(value))
    return f"value {name} {value!r:.30}"


def json_structure(rng: random.Random, files: dict[str, bytes]) -> str:
    name, data = _pick_json(rng, files)
    if name is None:
        return "structure -"
    op = rng.choice(["drop_field", "drop_record", "dup_record", "swap", "top_level", "drop_column"])
    if isinstance(data, list) and len(data) > 1:
        i, j = rng.randrange(len(data)), rng.randrange(len(data))
        if op == "drop_field" and data[i]:
            del data[i][rng.choice(list(data[i]))]
        elif op == "drop_record":
            del data[i]
        elif op == "dup_record":
            data.insert(j, dict(data[i]))
        elif op == "swap":
            data[i], data[j] = data[j], data[i]
    elif isinstance(data, dict) and data:
        col = rng.choice(list(data))
        if op in ("drop_column", "drop_field"):
            del data[col]
        elif op == "drop_record" and data[col]:
            del data[col][rng.choice(list(data[col]))]
        elif op == "dup_record":
            data[col][str(len(data[col]) + rng.randrange(3))] = next(iter(data[col].values()), None)
    if op == "top_level":
        data = rng.choice([None, 3, "x", [1, 2], {"Uid": [1]}, [[1]]])
    files[name] = _dumps(data)
    return f"structure {name} {op}"


def flip_bytes(rng: random.Random, files: dict[str, bytes]) -> str:
    if not files:
        return "flip -"
    name = rng.choice(list(files))
    data = bytearray(files[name])
    for _ in range(rng.randint(1, 5)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    files[name] = bytes(data)
    return f"flip {name}"


def truncate(rng: random.Random, files: dict[str, bytes]) -> str:
    if not files:
        return "truncate -"
    name = rng.choice(list(files))
    files[name] = files[name][: rng.randrange(len(files[name]) + 1)]
    return f"truncate {name}"


def insert_bytes(rng: random.Random, files: dict[str, bytes]) -> str:
    if not files:
        return "insert -"
    name = rng.choice(list(files))
    at = rng.randrange(len(files[name]) + 1)
    files[name] = files[name][:at] + rng.choice(INSERTS) + files[name][at:]
    return f"insert {name}@{at}"


def edit_lines(rng: random.Random, files: dict[str, bytes]) -> str:
    names = [n for n in files if n.endswith(".txt")]
    if not names:
        return "lines -"
    name = rng.choice(names)
    lines = files[name].decode("utf-8", "surrogateescape").splitlines()
    i = rng.randrange(len(lines) + 1)
    op = rng.choice(["blank", "drop", "dup", "replace"])
    if op == "blank":
        lines.insert(i, rng.choice(["", "  ", "\t"]))
    elif op == "drop" and lines:
        del lines[min(i, len(lines) - 1)]
    elif op == "dup" and lines:
        lines.insert(i, lines[min(i, len(lines) - 1)])
    elif op == "replace" and lines:
        lines[min(i, len(lines) - 1)] = rng.choice(HOSTILE_LINES)
    files[name] = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    return f"lines {name} {op}"


def file_ops(rng: random.Random, files: dict[str, bytes]) -> str:
    if not files:
        return "file -"
    name = rng.choice(list(files))
    op = rng.choice(["delete", "alias"])
    if op == "delete":
        del files[name]
    else:
        folder, base = name.split("/")
        split = base.split("_")[0]
        files[f"{folder}/{split}_tags.json"] = files.get(f"{folder}/{split}_text.json", b"[]")
    return f"file {op} {name}"


MUTATORS = [json_value, json_value, json_value, json_structure, flip_bytes, truncate, insert_bytes, edit_lines,
            edit_lines, file_ops]


def _write(root: Path, files: dict[str, bytes], rng: random.Random) -> str:
    """Lay the metadata out under ``root`` (folders, or one split zipped, possibly damaged); returns a note."""
    for old in list(root.glob("*_allmetadata_json")) + list(root.glob("*.zip")):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    zipped = rng.choice(["train", "test", None, None])
    for name, data in files.items():
        if not name.startswith(f"{zipped}_"):
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).write_bytes(data)
    if zipped is None:
        return "folders"
    zpath = root / f"{zipped}_allmetadata_json.zip"
    with zipfile.ZipFile(zpath, "w", compression=rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])) as zf:
        for name, data in files.items():
            if name.startswith(f"{zipped}_"):
                zf.writestr(name, data)
        if rng.random() < 0.2 and files:
            zf.writestr(f"copy/{rng.choice(list(files)).split('/')[1]}", b"[]")
    if rng.random() < 0.3:
        data = bytearray(zpath.read_bytes())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 0xFF
        zpath.write_bytes(bytes(data))
        return f"zip {zipped} damaged"
    return f"zip {zipped}"


def _image_lines(files: dict[str, bytes], split: str) -> int | None:
    data = files.get(f"{split}_allmetadata_json/{split}_img_filepath.txt")
    return None if data is None else len([ln for ln in data.decode("utf-8-sig").splitlines() if ln.strip()])


def _check_table(posts, files: dict[str, bytes], tmp_path: Path) -> None:
    assert list(posts.columns) == list(COLUMNS)
    assert posts.post_id.is_unique
    for split, n in posts.split.value_counts().items():
        assert n == _image_lines(files, split), split
    assert posts.postdate.between(*POSTDATE_RANGE).all()
    assert posts.geoaccuracy.between(0, 16).all()
    assert (posts.latitude.abs() <= 90).where(posts.latitude.notna(), True).all()
    assert (posts.longitude.abs() <= 180).where(posts.longitude.notna(), True).all()
    for col in FLOAT_COLUMNS:
        assert not np.isinf(posts[col].to_numpy()).any(), col
    assert posts.label[posts.split == "train"].notna().all()
    write_posts(posts, tmp_path / "posts.parquet")  # every string is valid UTF-8


def test_reader_returns_a_table_or_raises_its_own_error(base, tmp_path):
    root, clean = base
    outcomes = {"table": 0, "error": 0}
    for case in range(N_CASES):
        rng = random.Random(SEED * 100_003 + case)
        files = dict(clean)
        mutators = [json_value] if case % 2 == 0 else MUTATORS  # half the cases: hostile values only
        notes = [rng.choice(mutators)(rng, files) for _ in range(rng.randint(1, 3))]
        notes.append(_write(root, files, rng))
        try:
            posts = read_smpd(root)
        except SMPDFormatError as err:
            assert str(root) in str(err), f"case {case} {notes}: error names no file: {err}"
            outcomes["error"] += 1
            continue
        except Exception as err:  # noqa: BLE001 - the property under test
            pytest.fail(f"case {case} {notes}: {type(err).__name__}: {err!s:.300}")
        try:
            _check_table(posts, files, tmp_path)
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"case {case} {notes}: bad table: {type(err).__name__}: {err!s:.300}")
        outcomes["table"] += 1
    assert outcomes["table"] >= 30 and outcomes["error"] >= 30, outcomes  # both branches are exercised
