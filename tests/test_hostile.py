"""Hostile cases of issue #27: a run directory you can trust. Failed or partial reruns leave what ``predict.py`` reads
as it was; ``Predictor`` loads only a consistent run; nothing outside ``data.root`` is opened; everything checkable is
checked before the first write; a posts DataFrame is validated; every user-caused failure is one ``error:`` line.

One finished ``debug=fast`` run per module (``finished``), copied per test that touches it; the tests that read it
are marked slow, the others build a tiny SMPD directory and fail (or pass) in about a second."""

from __future__ import annotations

import builtins
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import compose_fast, finished_run, spy_file_calls
from tests.test_run_integrity import SMALL


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(run dir, data root) of one finished small run; never modified (tests copy it)."""
    return finished_run(tmp_path_factory, "hostile", *SMALL)


def _copy(finished, tmp_path) -> tuple[Path, Path]:
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(finished[0], run, symlinks=True)
    shutil.copytree(finished[1], data, symlinks=True)
    return run, data


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the lock file included) -> sha256 of its bytes; Hydra's record of each launch
    (``.hydra/``, ``train.log``: written by every launch that passes the up-front checks, read by nothing) aside."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not _launch_record(root, p)}


def _launch_record(run: Path, path: Path) -> bool:
    """Whether ``path`` is Hydra's record of a launch (``.hydra/``, ``train.log``): written by every launch that
    passes the checks made before Hydra starts, read by nothing."""
    return path.relative_to(run).parts[0] in (".hydra", "train.log")


def _train_main(tmp_path, run: Path, *overrides: str, capsys) -> tuple[int, str]:
    from popstack.commands.train import main

    code = main(["debug=fast", f"paths.root_dir={tmp_path}", f"hydra.run.dir={run}", *SMALL, *overrides])
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    """The one ``error:`` line of a failed command's stderr (the log lines of the stages that ran may precede it;
    no traceback may)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _unlocked(run: Path) -> bool:
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# ------------------------------------------------------------------ cases 1-2: validate first, write after
@pytest.mark.slow  # reads the module's finished pipeline run
@pytest.mark.parametrize("overrides, says", [
    (("data=smpd", "data.root=/nonexistent", "data.text_field=title"), "is not a directory"),
    (("data=smpd", "data.root={file}", "data.text_field=title"), "is not a directory"),
    (("data=smpd", "data.root=/usr"), "does not look like SMPD data"),
    (("stages=[prepare]", "data.root={data}", "data.text_field=title"), "finished in"),
    (("stages=[prepare]", "data.root={data}", "features.tfidf_dim=3"), "finished in"),
    (("stages=[prepare]", "data.root={data}", "{edit_label}"), "would rerun"),
])
def test_failed_or_partial_rerun_leaves_the_run_as_it_was(finished, tmp_path, capsys, overrides, says):
    run, data = _copy(finished, tmp_path)
    (tmp_path / "file").write_text("x")
    args = []
    for o in overrides:
        if o == "{edit_label}":  # a raw input changes: prepare would rerun under finished downstream stages
            labels = data / "train_allmetadata_json" / "train_label.txt"
            labels.write_text(labels.read_text().replace("\n", "0\n", 1))
            continue
        args.append(o.format(file=tmp_path / "file", data=data))
    before = _snapshot(run)
    code, err = _train_main(tmp_path, run, *args, capsys=capsys)
    assert code == 2 and _one_error_line(err).startswith("error:") and says in err, err
    assert _snapshot(run) == before  # config.yaml, manifests, the lock file: byte for byte
    assert _unlocked(run)


def test_partial_run_on_an_empty_run_dir_writes_nothing(tmp_path, capsys):
    run = tmp_path / "empty"
    code, err = _train_main(tmp_path, run, "stages=[stack]", capsys=capsys)
    assert code == 2 and "needs the outputs of 'prepare'" in err, err
    assert not run.exists()


# ------------------------------------------------------------------ case 3: only a consistent run predicts
def _kill_extract(monkeypatch):
    import popstack.pipeline.stages.extract as extract

    def killed(ctx):
        raise KeyboardInterrupt
    monkeypatch.setattr(extract, "run", killed)


def _break_stack_member(run: Path) -> str:
    member = next(p for p in sorted((run / "stack" / "model").rglob("*")) if p.is_file() and p.name != "stack.json")
    member.write_bytes(b"garbled")
    return member.relative_to(run).as_posix()


@pytest.mark.slow  # reads the module's finished pipeline run
@pytest.mark.parametrize("damage, says", [
    ("rerun_killed", "out of date"),
    ("member_garbled", "changed since the stage wrote it"),
    ("member_missing", "missing"),
    ("backbone_planted", "embeddings/backbone.pt changed"),
    ("pca_objects", "neural/pca.npz changed"),
    ("checkpoint_planted", "changed since the stage wrote it"),
    ("manifest_missing", "no readable manifest"),
    ("upstream_rerun", "out of date"),
    ("config_garbled", "not a readable config"),
])
def test_predictor_refuses_an_inconsistent_run_before_any_work(finished, tmp_path, monkeypatch, damage, says):
    from popstack.pipeline.errors import UserError
    from popstack.pipeline.inference import Predictor

    run, data = _copy(finished, tmp_path)
    if damage == "rerun_killed":  # seed=7 rerun: prepare, features, neural finish, then a kill during extract
        from popstack import train

        _kill_extract(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            train(compose_fast(tmp_path, *SMALL, f"data.root={data}", f"hydra.run.dir={run}", "seed=7"))
        monkeypatch.undo()
    elif damage == "member_garbled":
        _break_stack_member(run)
    elif damage == "member_missing":
        (run / "stack" / "model" / "members").rename(run / "stack" / "members-moved")
    elif damage == "backbone_planted":
        (run / "embeddings" / "backbone.pt").write_bytes(b"not a checkpoint")
    elif damage == "pca_objects":
        np.savez(run / "neural" / "pca.npz", mean=np.array([{"a": 1}], dtype=object))
    elif damage == "checkpoint_planted":
        ckpt = next((run / "neural").rglob("*.ckpt"))
        ckpt.write_bytes(b"PK not a checkpoint")
    elif damage == "manifest_missing":
        (run / "manifests" / "extract.json").unlink()
    elif damage == "upstream_rerun":  # features' output replaced after neural read it (recorded as a finished rerun)
        from popstack.pipeline.manifest import Manifest, checksum

        path = run / "manifests" / "features.json"
        m = Manifest.read(path)
        tab = run / "features" / "tabular.parquet"
        frame = pd.read_parquet(tab)
        col = frame.select_dtypes("number").columns[0]
        frame.loc[0, col] += 1
        frame.to_parquet(tab, index=False)
        m.checksums["features/tabular.parquet"] = checksum(tab)
        path.write_text(json.dumps(m.record()))
    elif damage == "config_garbled":
        (run / "config.yaml").write_text("a: [unclosed\n")
    import popstack.pipeline.neural as neural

    def no_work(*a, **k):
        raise AssertionError("neural work started on an inconsistent run")
    monkeypatch.setattr(neural, "build_cache", no_work)
    with pytest.raises(UserError, match=says):
        Predictor.from_run_dir(run)


@pytest.mark.slow  # reads the module's finished pipeline run
def test_a_consistent_copy_still_loads(finished, tmp_path):
    from popstack.pipeline.inference import Predictor

    run, _ = _copy(finished, tmp_path)
    for p in run.rglob("*"):  # a copy with new mtimes: re-hashed, accepted
        if p.is_file():
            os.utime(p, ns=(1, 1))
    assert Predictor.from_run_dir(run).columns


# ------------------------------------------------------------------ cases 4, 6: nothing outside data.root
@pytest.fixture
def raw(tmp_path) -> Path:
    """A tiny SMPD-layout directory (synthetic generator): 24 train + 6 test posts."""
    from popstack.datamodules.synthetic import generate

    root = tmp_path / "raw"
    generate(root, n_train=24, n_test=6, seed=0, n_subcategories=3)
    return root


def _move_out(root: Path, rel: str, outside: Path) -> None:
    """Move ``rel`` out of the root and leave an (absolute) symlink to it in its place."""
    outside.mkdir(exist_ok=True)
    target = outside / Path(rel).name
    shutil.move(str(root / rel), target)
    (root / rel).symlink_to(target)


@pytest.mark.parametrize("rel", ["train_allmetadata_json/train_label.txt", "train_allmetadata_json",
                                 "train_allmetadata_json/train_text.json"])
def test_metadata_symlinked_out_of_the_root_is_refused_by_name(raw, tmp_path, rel):
    from popstack.datamodules.smpd import SMPDFormatError, read_smpd

    _move_out(raw, rel, tmp_path / "outside")
    with pytest.raises(SMPDFormatError, match="outside the data root"):
        read_smpd(raw)


def test_fingerprint_never_touches_anything_outside_the_root(raw, tmp_path, monkeypatch):
    from popstack.pipeline.manifest import raw_fingerprint

    outside = tmp_path / "outside"
    image = next(p for p in sorted((raw / "train").rglob("*.jpg")))
    _move_out(raw, image.relative_to(raw).as_posix(), outside)                    # a symlinked image
    (raw / "more").symlink_to(outside)                                            # a symlinked folder
    (outside / "big.txt").write_text("x" * 100)
    touched = spy_file_calls(monkeypatch, ((os, "stat"), (os, "lstat"), (os, "open"), (os, "scandir"), (io, "open"),
                                           (builtins, "open")))
    fp = raw_fingerprint(raw)
    monkeypatch.undo()
    assert any(p.startswith(str(raw)) for p in touched)
    assert not [p for p in touched if p.startswith(str(outside))]
    assert fp[image.relative_to(raw).as_posix()][0] == -1 and fp["more"][0] == -1
    assert not [name for name in fp if name.startswith("more/")]


def test_a_run_directory_inside_the_data_root_is_not_part_of_its_fingerprint(raw, tmp_path):
    from popstack.pipeline.stages.prepare import outside_inputs

    cfg = compose_fast(tmp_path, "data=smpd", f"data.root={raw}", f"hydra.run.dir={raw / 'runs' / 'a'}")
    before = outside_inputs(cfg)
    (raw / "runs" / "a" / "shards").mkdir(parents=True)
    (raw / "runs" / "a" / "shards" / "train-000000.tar").write_bytes(b"new output")
    (raw / "runs" / "a" / "config.yaml").write_text("seed: 1\n")
    assert outside_inputs(cfg) == before


# ------------------------------------------------------------------ case 5: the Python API's DataFrame
def _frame(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"post_id": [f"p{i}" for i in range(n)], "uid": ["u1"] * n,
                         "image_path": [f"x/{i}.jpg" for i in range(n)], "title": ["sunset", "", "cat"][:n],
                         "alltags": ["a b", "c", ""][:n], "postdate": [1420070400 + i for i in range(n)],
                         "category": ["Animal", "Travel", "Animal"][:n], "latitude": [1.5, np.nan, -3.0][:n]})


def test_smpd_spelled_columns_mean_the_same_as_lower_case(tmp_path):
    from popstack.pipeline.inference import posts_from_frame

    plain = _frame()
    smpd = plain.rename(columns={"post_id": "Pid", "uid": "Uid", "title": "Title", "alltags": "Alltags",
                                 "postdate": "Postdate", "category": "Category", "latitude": "Latitude"})
    pd.testing.assert_frame_equal(posts_from_frame(smpd, tmp_path), posts_from_frame(plain, tmp_path))
    dated = plain.assign(postdate=["2015-01-01 00:00:00", "2015-01-01", pd.Timestamp("2015-01-01", tz="UTC")])
    assert posts_from_frame(dated, tmp_path).postdate.tolist() == [1420070400] * 3


@pytest.mark.parametrize("change, says", [
    ({"Title": ["x", "y", "z"]}, "all mean 'title'"),
    ({"likes": [1, 2, 3]}, "unknown column(s) ['likes']"),
    ({"latitude": ["abc", 1.0, 2.0]}, "column 'latitude', row 0: 'abc' is not a number"),
    ({"postdate": ["yesterday-ish", 1, 2]}, "column 'postdate', row 0"),
    ({"post_id": [None, "b", "c"]}, "column 'post_id', row 0"),
    ({"user_vector": [[0.5] * 10, None, None]}, "column 'user_vector', row 0: 10 values, expected 399"),
    ({"category": [{"a": 1}, "b", "c"]}, "column 'category', row 0"),
    ({"user_description": ["x", "y", "z"]}, "user_description"),
])
def test_a_bad_dataframe_is_one_error_naming_the_column(tmp_path, change, says):
    from popstack.pipeline.errors import UserError
    from popstack.pipeline.inference import posts_from_frame

    with pytest.raises(UserError) as err:
        posts_from_frame(_frame().assign(**change), tmp_path)
    assert says in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ case 7 and U+2028: the reader's repairs
def _edit_records(root: Path, name: str, row: int, **fields) -> None:
    path = root / "train_allmetadata_json" / f"train_{name}.json"
    records = json.loads(path.read_text())
    records[row].update(fields)
    path.write_text(json.dumps(records))


def test_wrong_types_in_class_and_text_fields_are_counted_repairs(raw):
    from popstack.datamodules.smpd import read_smpd

    _edit_records(raw, "category", 0, Category=None, Subcategory={"a": 1}, Concept=["x"])
    _edit_records(raw, "text", 1, Title={"a": 1}, Alltags=True)
    posts = read_smpd(raw)
    shown = set(posts[["category", "subcategory", "concept", "title", "alltags"]].to_numpy().ravel())
    assert not shown & {"None", "{'a': 1}", "['x']", "True"}
    repairs = posts.attrs["repairs"]
    assert (repairs["category"], repairs["subcategory"], repairs["concept"]) == (1, 1, 1)
    assert (repairs["title"], repairs["alltags"]) == (1, 1)


def test_a_pid_with_a_line_separator_reads(raw):
    from popstack.datamodules.smpd import read_smpd

    meta = raw / "train_allmetadata_json"
    lines = (meta / "train_img_filepath.txt").read_text().splitlines()
    old = lines[0]
    pid = Path(old).stem
    new = old.replace(pid + ".jpg", pid + "\u2028x.jpg")
    (raw / old).rename(raw / new)
    lines[0] = new
    (meta / "train_img_filepath.txt").write_text("\n".join(lines) + "\n")
    for name in ("category", "text", "temporalspatial_information", "additional_information"):
        _edit_records(raw, name, 0, Pid=pid + "\u2028x")
    users = json.loads((meta / "train_user_data.json").read_text())
    users["Pid"]["0"] = pid + "\u2028x"
    (meta / "train_user_data.json").write_text(json.dumps(users))
    posts = read_smpd(raw)
    assert posts.post_id.iloc[0] == pid + "\u2028x" and posts.image_status.iloc[0] == "ok"


# ------------------------------------------------------------------ late failures, now checked before any write
def _labels(root: Path, values) -> None:
    (root / "train_allmetadata_json" / "train_label.txt").write_text("".join(f"{v}\n" for v in values))


@pytest.mark.parametrize("edit, overrides, says", [
    ("huge", (), "beyond checks.label_abs_max"),
    ("equal", (), "all 24 labels equal"),
    ("three", (), "fewer than checks.min_fit_posts"),
    (None, ("n_folds=30",), "cannot be split into 30 folds"),
    ("one_user", ("folds.strategy=user",), "needs at least n_folds=2 users"),
])
def test_what_would_fail_late_fails_before_the_first_write(raw, tmp_path, capsys, edit, overrides, says):
    n = 24
    if edit == "huge":
        _labels(raw, [5.0] * (n - 1) + ["1e300"])
    elif edit == "equal":
        _labels(raw, [5.0] * n)
    elif edit == "three":  # 3 training posts: a fold's fit has 1 (BatchNorm needs 2)
        from popstack.datamodules.synthetic import generate

        shutil.rmtree(raw)
        generate(raw, n_train=3, n_test=2, seed=0, n_subcategories=2)
    elif edit == "one_user":
        meta = raw / "train_allmetadata_json"
        lines = (meta / "train_img_filepath.txt").read_text().splitlines()
        uid0 = lines[0].split("/")[-2]
        new = []
        for line in lines:
            parts = line.split("/")
            if parts[-2] != uid0 and (raw / line).exists():
                (raw / "train" / uid0).mkdir(exist_ok=True)
                (raw / line).rename(raw / "train" / uid0 / parts[-1])
            parts[-2] = uid0
            new.append("/".join(parts))
        (meta / "train_img_filepath.txt").write_text("\n".join(new) + "\n")
        for name in ("category", "text", "temporalspatial_information", "additional_information"):
            path = meta / f"train_{name}.json"
            path.write_text(json.dumps([{**r, "Uid": uid0} for r in json.loads(path.read_text())]))
        users = json.loads((meta / "train_user_data.json").read_text())
        users["Uid"] = {k: uid0 for k in users["Uid"]}
        (meta / "train_user_data.json").write_text(json.dumps(users))
    run = tmp_path / "run"
    code, err = _train_main(tmp_path, run, "data=smpd", f"data.root={raw}", "stages=[prepare]", *overrides,
                            capsys=capsys)
    assert code == 2 and _one_error_line(err).startswith("error:") and says in err, err
    assert not [p for p in run.rglob("*") if p.name != ".lock" and not _launch_record(run, p)], list(run.rglob("*"))


def test_not_enough_disk_space_is_refused_before_the_shards(raw, tmp_path, capsys, monkeypatch):
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    code, err = _train_main(tmp_path, tmp_path / "run", "data=smpd", f"data.root={raw}", "stages=[prepare]",
                            capsys=capsys)
    assert code == 2 and "not enough free disk space" in err, err
    assert not (tmp_path / "run" / "shards").exists()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:603] . "
                                                  "PytorchStreamWriter failed writing file data/0: file write failed")])
def test_disk_full_is_one_error_line(raw, tmp_path, capsys, monkeypatch, failure):
    import popstack.pipeline.stages.prepare as prepare

    def full(*a, **k):
        raise failure
    monkeypatch.setattr(prepare, "write_split_shards", full)
    code, err = _train_main(tmp_path, tmp_path / "run", "data=smpd", f"data.root={raw}", "stages=[prepare]",
                            capsys=capsys)
    assert code == 2 and _one_error_line(err).startswith("error: disk full"), err


def test_predict_refuses_unwritable_out_and_zero_devices(raw, tmp_path, capsys):
    import popstack.commands.predict as predict
    from popstack.pipeline.errors import UserError

    with pytest.raises(UserError, match="cannot write"):
        predict.check_out(Path("/proc/x.json"))
    code = predict.main([str(tmp_path), str(raw), "--out", str(tmp_path / "p.json"), "--devices", "0"])
    assert code == 2 and "--devices 0" in capsys.readouterr().err


@pytest.mark.slow  # reads the module's finished pipeline run
def test_a_run_from_before_the_records_gets_them_from_one_skipping_rerun(finished, tmp_path, caplog):
    from popstack import train
    from popstack.pipeline.errors import UserError
    from popstack.pipeline.inference import Predictor

    run, data = _copy(finished, tmp_path)
    for path in (run / "manifests").glob("*.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in record.items() if k not in ("config", "upstream")}))
    with pytest.raises(UserError, match="predates"):
        Predictor.from_run_dir(run)
    with caplog.at_level("INFO", logger="popstack"):
        train(compose_fast(tmp_path, *SMALL, f"data.root={data}", f"hydra.run.dir={run}"))
    assert not [r for r in caplog.records if "] running" in r.getMessage()]
    assert Predictor.from_run_dir(run).columns


@pytest.mark.slow  # reads the module's finished pipeline run
def test_planted_files_in_a_run_are_rebuilt_by_the_next_train(finished, tmp_path, caplog):
    """A non-checkpoint ``best.ckpt`` and a garbage ``backbone.pt``: the stage's own caches (done.json, the cache
    key) must not keep them; the rerun rebuilds both byte for byte and nothing downstream changes."""
    from popstack import train

    run, data = _copy(finished, tmp_path)
    (run / "embeddings" / "backbone.pt").write_bytes(b"garbage")
    ckpt = next((run / "neural").rglob("best.ckpt"))
    ckpt.write_bytes(b"PK\x03\x04 not a checkpoint")
    with caplog.at_level("INFO", logger="popstack"):
        train(compose_fast(tmp_path, *SMALL, f"data.root={data}", f"hydra.run.dir={run}"))
    for rel in ("embeddings/backbone.pt", ckpt.relative_to(run).as_posix(), "predictions.parquet"):
        assert (run / rel).read_bytes() == (finished[0] / rel).read_bytes(), rel
    ran = {m.split("]")[0][1:] for m in (r.getMessage() for r in caplog.records) if "] running" in m}
    assert ran == {"neural"}, ran
