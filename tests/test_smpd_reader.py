"""The real-SMPD reader on small generated directories: both name sets, both user variants, zips, bad input."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from popstack.datamodules.schema import COLUMNS, IMAGE_MISSING, IMAGE_OK, IMAGE_OUTSIDE
from popstack.datamodules.smpd import SMPDFormatError, read_posts, read_smpd, read_split, vector_matrix, write_posts
from popstack.datamodules.synthetic import generate, make_posts
from tests.helpers import spy_file_calls


def raw_dir(tmp_path, naming="2025", user_variant="A", n_train=30, n_test=12, mess=False):
    root = tmp_path / f"raw-{naming}-{user_variant}"
    generate(root, n_train, n_test, seed=3, n_subcategories=5, user_variant=user_variant, naming=naming,
             image_mess=mess)
    return root


META = "train_allmetadata_json"


def load(root, name):
    return json.loads((root / META / name).read_text())


def dump(root, name, data):
    (root / META / name).write_text(json.dumps(data))


@pytest.mark.parametrize("naming", ["2025", "2020"])
@pytest.mark.parametrize("variant", ["A", "B"])
def test_round_trip_matches_generator(tmp_path, naming, variant):
    root = raw_dir(tmp_path, naming, variant)
    posts = read_smpd(root)
    expected, _, labels = make_posts(30, 12, 3, n_subcategories=5, user_variant=variant)
    assert list(posts.columns) == list(COLUMNS)
    assert posts.post_id.tolist() == expected.post_id.tolist()
    assert posts.split.tolist() == ["train"] * 30 + ["test"] * 12
    for col in ("uid", "subcategory", "concept", "title", "alltags", "postdate", "geoaccuracy"):
        assert posts[col].tolist() == expected[col].tolist(), col
    for col in ("latitude", "longitude", "photo_count", "ispro", "photo_firstdate", "photo_firstdatetaken"):
        np.testing.assert_allclose(posts[col], expected[col], equal_nan=True, err_msg=col)
    np.testing.assert_allclose(posts.label[:30], labels[:30])
    assert posts.label[30:].isna().all()
    if variant == "A":
        np.testing.assert_allclose(vector_matrix(posts, "user_vector"), vector_matrix(expected, "user_vector"),
                                   atol=1e-4, equal_nan=True)
        assert posts.user_text.isna().all()
    else:
        assert posts.user_vector.isna().all()
        assert posts.user_text.dropna().str.startswith("photographer").all()
        assert posts.canbuypro.isna().all()


def test_parquet_round_trip_keeps_vectors(tmp_path):
    posts = read_smpd(raw_dir(tmp_path))
    write_posts(posts, tmp_path / "posts.parquet")
    back = read_posts(tmp_path / "posts.parquet")
    assert back.post_id.tolist() == posts.post_id.tolist()
    np.testing.assert_array_equal(vector_matrix(back, "location_vector"), vector_matrix(posts, "location_vector"))
    assert back.location_vector.isna().sum() == posts.location_vector.isna().sum()


def test_zip_input(tmp_path):
    root = raw_dir(tmp_path)
    folder = root / META
    with zipfile.ZipFile(root / f"{META}.zip", "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"{META}/{f.name}")
    shutil.rmtree(folder)
    posts = read_split(root, "train")
    assert len(posts) == 30 and posts.label.notna().all()


def test_missing_image_and_no_geo_are_counted_not_fatal(tmp_path):
    root = raw_dir(tmp_path)
    posts = read_smpd(root)
    (root / posts.image_relpath[0]).unlink()
    again = read_smpd(root)
    assert again.image_status[0] == IMAGE_MISSING
    assert (again.image_status[1:] == IMAGE_OK).all()
    assert again.latitude.isna().sum() > 0  # "0" and "" coordinates -> NaN


def test_user_list_form_and_tile_alias(tmp_path):
    root = raw_dir(tmp_path)
    users = load(root, "train_user_data.json")
    n = len(users["Uid"])
    dump(root, "train_user_data.json", [{c: users[c][str(i)] for c in users} for i in range(n)])
    text = load(root, "train_text.json")
    for rec in text:
        rec["Tile"] = rec.pop("Title")
    dump(root, "train_text.json", text)
    posts = read_split(root, "train")
    assert posts.title.tolist() == [r["Tile"] for r in text]
    assert posts.photo_count.notna().sum() > 0


def test_header_line_in_labels_is_skipped(tmp_path):
    root = raw_dir(tmp_path)
    path = root / META / "train_label.txt"
    path.write_text("Popularityscore\n" + path.read_text())
    assert read_split(root, "train").label.notna().all()


# ------------------------------------------------------------------ bad input: clear errors
def _truncate_json(root):
    p = root / META / "train_category.json"
    p.write_text(p.read_text()[:-40])


def _misalign_rows(root):
    dump(root, "train_text.json", load(root, "train_text.json")[:-1])


def _pid_mismatch(root):
    recs = load(root, "train_temporalspatial_information.json")
    recs[4]["Pid"] = "999999999"
    dump(root, "train_temporalspatial_information.json", recs)


def _bad_label(root):
    p = root / META / "train_label.txt"
    lines = p.read_text().splitlines()
    lines[6] = "abc"
    p.write_text("\n".join(lines) + "\n")


def _missing_file(root):
    (root / META / "train_category.json").unlink()


def _duplicate_pid(root):
    img = (root / META / "train_img_filepath.txt").read_text().splitlines()
    uid0, pid0 = img[0].split("/")[1], img[0].split("/")[2].removesuffix(".jpg")
    img[3] = img[0]
    (root / META / "train_img_filepath.txt").write_text("\n".join(img) + "\n")
    for name in ("train_category.json", "train_text.json", "train_temporalspatial_information.json",
                 "train_additional_information.json"):
        recs = load(root, name)
        recs[3]["Uid"], recs[3]["Pid"] = uid0, pid0
        dump(root, name, recs)
    users = load(root, "train_user_data.json")
    users["Uid"]["3"], users["Pid"]["3"] = uid0, int(pid0)
    dump(root, "train_user_data.json", users)


def _wrong_vector_length(root):
    users = load(root, "train_user_data.json")
    key = next(k for k, v in users["user_description"].items() if v)
    users["user_description"][key] = ",".join(["0.1"] * 120)
    dump(root, "train_user_data.json", users)


def _bad_postdate(root):
    recs = load(root, "train_temporalspatial_information.json")
    recs[2]["Postdate"] = "yesterday"
    dump(root, "train_temporalspatial_information.json", recs)


def _no_labels(root):
    (root / META / "train_label.txt").unlink()


def _bad_label_after_blank_lines(root):
    p = root / META / "train_label.txt"
    lines = p.read_text().splitlines()
    lines[6] = "abc"
    p.write_text("\n\n" + "\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # "abc" on line 10


def _postdate_raw(text):
    """A breaker that writes ``text`` (raw JSON) as row 2's Postdate."""
    def breaker(root):
        recs = load(root, "train_temporalspatial_information.json")
        recs[2]["Postdate"] = "@POSTDATE@"
        path = root / META / "train_temporalspatial_information.json"
        path.write_text(json.dumps(recs).replace('"@POSTDATE@"', text))
    return breaker


@pytest.mark.parametrize("breaker, expected", [
    (_truncate_json, ["train_category.json", "invalid JSON"]),
    (_misalign_rows, ["train_text.json", "rows"]),
    (_pid_mismatch, ["train_temporalspatial_information.json", "row 4", "Pid"]),
    (_bad_label, ["train_label.txt", "line 7", "abc"]),
    (_missing_file, ["category", "train_category.json"]),
    (_duplicate_pid, ["duplicate Pid", "rows 0 and 3"]),
    (_wrong_vector_length, ["train_user_data.json", "user_description", "120 values"]),
    (_bad_postdate, ["row 2", "Postdate"]),
    (_no_labels, ["train_label.txt"]),
    (_bad_label_after_blank_lines, ["train_label.txt", "line 10", "abc"]),
    (_postdate_raw('"Infinity"'), ["train_temporalspatial_information.json", "row 2", "Postdate"]),
    (_postdate_raw("1e400"), ["train_temporalspatial_information.json", "row 2", "Postdate"]),
    (_postdate_raw("Infinity"), ["train_temporalspatial_information.json", "row 2", "Postdate"]),
    (_postdate_raw('"99999999999"'), ["row 2", "Postdate", "plausible range"]),
    (_postdate_raw('"0"'), ["row 2", "Postdate", "plausible range"]),
    (_postdate_raw("1" + "0" * 400), ["row 2", "Postdate"]),
])
def test_bad_input_names_file_row_field(tmp_path, breaker, expected):
    root = raw_dir(tmp_path)
    breaker(root)
    with pytest.raises(SMPDFormatError) as err:
        read_smpd(root)
    for piece in expected:
        assert piece in str(err.value), (piece, str(err.value))


def test_postdate_window_is_a_setting_and_older_posts_read_when_widened(tmp_path):
    import yaml

    from popstack.datamodules.smpd import POSTDATE_RANGE, postdate_window
    from popstack.pipeline.schema import ConfigError, validate

    root = raw_dir(tmp_path)
    _postdate_raw('"631152000"')(root)  # 1990-01-01: an archive older than Flickr
    with pytest.raises(SMPDFormatError, match="outside the plausible range 2004-01-01 .. 2100-01-01"):
        read_smpd(root)
    posts = read_smpd(root, postdate_range=postdate_window(["1990-01-01", "2100-01-01"]))
    assert posts.postdate.iloc[2] == 631152000
    with pytest.raises(SMPDFormatError, match="outside the plausible range 1995-01-01 .. 2100-01-01"):
        read_smpd(root, postdate_range=postdate_window(["1995-01-01", "2100-01-01"]))
    # the configs' default is SMPD's window, written once (the data group's typed config) and equal to the
    # reader's own default, for every source
    from popstack.datamodules.config import DataConfig
    from popstack.datamodules.sources import sources

    assert postdate_window(DataConfig().postdate_range) == POSTDATE_RANGE
    for name in sources():
        text = (Path(__file__).parent.parent / "configs" / "data" / f"{name}.yaml").read_text()
        assert "postdate_range" not in yaml.safe_load(text)
    for bad in (["2100-01-01", "2004-01-01"], ["2004-01-01"], ["yesterday", "2100-01-01"]):
        with pytest.raises(ValueError):
            postdate_window(bad)
    from omegaconf import OmegaConf

    from tests.helpers import compose_fast
    with pytest.raises(ConfigError, match="postdate_range"):
        validate(compose_fast(tmp_path, "data.postdate_range=[2100-01-01,2004-01-01]"))
    assert OmegaConf.select(validate(compose_fast(tmp_path)), "data.postdate_range") is not None


def test_unknown_split_and_missing_root(tmp_path):
    with pytest.raises(SMPDFormatError, match="unknown split 'valid'"):
        read_split(raw_dir(tmp_path), "valid")
    with pytest.raises(SMPDFormatError, match="not found"):
        read_smpd(tmp_path / "nope")


def test_empty_tags_titles_and_null_users_are_data(tmp_path):
    root = raw_dir(tmp_path)
    text = load(root, "train_text.json")
    text[0]["Alltags"], text[0]["Title"] = "", ""
    dump(root, "train_text.json", text)
    users = load(root, "train_user_data.json")
    for col in ("photo_count", "ispro", "photo_firstdate", "timezone_offset", "user_description"):
        users[col]["0"] = None
    dump(root, "train_user_data.json", users)
    posts = read_split(root, "train")
    assert posts.alltags[0] == "" and posts.title[0] == ""
    assert np.isnan(posts.photo_count[0]) and posts.user_vector[0] is None


def test_inference_reads_without_labels(tmp_path):
    root = raw_dir(tmp_path)
    (root / META / "train_label.txt").unlink()
    posts = read_smpd(root, labels=False)
    assert len(posts) == 42 and posts.label.isna().all()


# ------------------------------------------------------------------ bad values: counted repairs
def _set_raw(root, name, row, field, raw_json):
    """Row ``row``'s ``field`` of list file ``name`` becomes the raw JSON text ``raw_json`` (e.g. ``1e400``)."""
    recs = load(root, name)
    recs[row][field] = "@VALUE@"
    (root / META / name).write_text(json.dumps(recs).replace('"@VALUE@"', raw_json))


def _geo_row(root):
    """A train row with a valid geotag (so that a repair is visible)."""
    recs = load(root, "train_temporalspatial_information.json")
    return next(i for i, r in enumerate(recs) if r["Latitude"] not in ("", "0") and r["Geoaccuracy"] != "0")


@pytest.mark.parametrize("field, raw, column", [
    ("Latitude", '"91.5"', "latitude"),
    ("Latitude", "Infinity", "latitude"),
    ("Longitude", '"-200"', "longitude"),
    ("Longitude", "1e400", "longitude"),
    ("Latitude", '"north"', "latitude"),
])
def test_bad_coordinate_is_a_counted_repair_to_no_geotag(tmp_path, field, raw, column):
    root = raw_dir(tmp_path)
    i = _geo_row(root)
    _set_raw(root, "train_temporalspatial_information.json", i, field, raw)
    posts = read_smpd(root)
    assert np.isnan(posts.latitude[i]) and np.isnan(posts.longitude[i])
    assert posts.attrs["repairs"][column] == 1
    assert sum(posts.attrs["repairs"].values()) == 1


@pytest.mark.parametrize("raw", ['"-3"', "1e400", '"17"', '"2.5"', "NaN"])
def test_bad_geoaccuracy_is_repaired_to_no_geotag(tmp_path, raw):
    root = raw_dir(tmp_path)
    i = _geo_row(root)
    _set_raw(root, "train_temporalspatial_information.json", i, "Geoaccuracy", raw)
    posts = read_smpd(root)
    assert posts.geoaccuracy[i] == 0 and np.isnan(posts.latitude[i])
    assert (posts.geoaccuracy >= 0).all() and (posts.geoaccuracy <= 16).all()
    assert posts.attrs["repairs"]["geoaccuracy"] == (0 if raw == "NaN" else 1)  # NaN is a null, not a repair


def test_non_finite_user_numbers_and_dates_are_repaired(tmp_path):
    root = raw_dir(tmp_path)
    text = (root / META / "train_user_data.json").read_text()
    users = json.loads(text)
    users["photo_count"]["1"] = "@A@"
    users["ispro"]["2"] = "@B@"
    users["photo_firstdate"]["3"] = "@C@"
    users["photo_firstdatetaken"]["4"] = "@D@"
    desc = users["user_description"]["5"].split(",")
    desc[7] = "inf"
    users["user_description"]["5"] = ",".join(desc)
    raw = json.dumps(users)
    for mark, value in (("A", "Infinity"), ("B", "1e400"), ("C", "-Infinity"), ("D", '"99999999999999"')):
        raw = raw.replace(f'"@{mark}@"', value)
    (root / META / "train_user_data.json").write_text(raw)
    posts = read_split(root, "train")
    assert np.isnan(posts.photo_count[1]) and np.isnan(posts.ispro[2])
    assert np.isnan(posts.photo_firstdate[3]) and np.isnan(posts.photo_firstdatetaken[4])
    assert posts.user_vector[5] is None
    fixed = {k: v for k, v in posts.attrs["repairs"].items() if v}
    assert fixed == {"photo_count": 1, "ispro": 1, "photo_firstdate": 1, "photo_firstdatetaken": 1, "user_vector": 1}
    for col in ("photo_count", "ispro", "photo_firstdate", "photo_firstdatetaken"):
        assert not np.isinf(posts[col]).any(), col


def test_lone_surrogate_in_title_is_replaced_and_counted(tmp_path):
    root = raw_dir(tmp_path)
    text = load(root, "train_text.json")
    text[0]["Title"] = "caf\ud800e"  # json.dumps writes the escape \ud800: valid JSON, invalid Unicode
    text[1]["Alltags"] = "\udfff"
    dump(root, "train_text.json", text)
    posts = read_smpd(root)
    assert posts.title[0] == "caf\ufffde" and posts.alltags[1] == "\ufffd"
    assert posts.attrs["repairs"]["title"] == 1 and posts.attrs["repairs"]["alltags"] == 1
    write_posts(posts, tmp_path / "posts.parquet")  # UTF-8 encodable everywhere
    assert read_posts(tmp_path / "posts.parquet").title[0] == "caf\ufffde"


# ------------------------------------------------------------------ image paths confined to the data root
def _retarget(root, row, new_path):
    """Point row ``row`` of the train image list at ``new_path`` (same <Uid>/<Pid> tail, so rows stay aligned)."""
    path = root / META / "train_img_filepath.txt"
    lines = path.read_text().splitlines()
    lines[row] = new_path
    path.write_text("\n".join(lines) + "\n")


def test_image_paths_outside_the_root_are_refused_and_never_touched(tmp_path, monkeypatch):
    import builtins
    import io
    import os

    from popstack.datamodules.shards import build_vocab, write_shards

    root = raw_dir(tmp_path)
    outside = tmp_path / "outside"
    posts = read_smpd(root)
    rel = posts.image_relpath.tolist()
    good = (root / rel[9]).read_bytes()
    tail = [r.split("/", 1)[1] for r in rel]  # "<Uid>/<Pid>.jpg"
    for i in range(6):
        (outside / tail[i]).parent.mkdir(parents=True, exist_ok=True)
        if i % 2 == 0:  # the status must not depend on whether the outside file exists
            (outside / tail[i]).write_bytes(good)
    _retarget(root, 0, f"../outside/{tail[0]}")                       # climbs out with ..
    _retarget(root, 1, str(outside / tail[1]))                        # absolute
    _retarget(root, 2, f"train/{tail[2].split('/')[0]}/../../../outside/{tail[2]}")  # .. after real folders
    (root / rel[3]).unlink()
    (root / rel[3]).symlink_to(outside / tail[3])                     # file symlink out (absolute target)
    (root / "linked").symlink_to("../outside")                         # folder symlink out (relative target)
    _retarget(root, 4, f"linked/{tail[4]}")
    (root / rel[5]).unlink()
    (root / rel[5]).symlink_to(os.path.relpath(outside / tail[5], (root / rel[5]).parent))
    store = root / "store"
    store.mkdir()
    (store / "x.jpg").write_bytes(good)
    (root / rel[6]).unlink()
    (root / rel[6]).symlink_to("../../store/x.jpg")                   # a symlink that stays inside: fine

    touched = spy_file_calls(monkeypatch, ((os, "stat"), (os, "lstat"), (os, "open"), (os, "readlink"), (io, "open"),
                                           (builtins, "open")))
    for check in (True, False):
        again = read_smpd(root, check_images=check)
        assert again.image_status[:6].tolist() == [IMAGE_OUTSIDE] * 6, check
        assert again.image_status[6] == IMAGE_OK
        vocab = build_vocab(again[again.split == "train"])
        info = write_shards(again[again.split == "train"], root, tmp_path / f"shards{check}", split="train",
                            class_ids=vocab, shard_size=100)
        assert [info.image_status[p] for p in again.post_id[:7]] == [IMAGE_OUTSIDE] * 6 + [IMAGE_OK]
    monkeypatch.undo()
    assert any(p.startswith(str(root / "train")) for p in touched)  # the spies saw the reader's file accesses
    assert not [p for p in touched if p.startswith(str(outside))]


# ------------------------------------------------------------------ archives
def _zip_root(tmp_path, extra=(), drop=(), compression=zipfile.ZIP_STORED):
    """The train metadata as a zip; ``extra`` = (member name, source file name) pairs added at the end."""
    root = raw_dir(tmp_path)
    folder = root / META
    with zipfile.ZipFile(root / f"{META}.zip", "w", compression=compression) as zf:
        for f in sorted(folder.iterdir()):
            if f.name not in drop:
                zf.write(f, f"{META}/{f.name}")
        for member, source in extra:
            zf.write(folder / source, member)
    shutil.rmtree(folder)
    return root


def test_zip_with_two_candidates_for_one_file_is_refused(tmp_path):
    root = _zip_root(tmp_path, extra=[("backup/old/train_label.txt", "train_category.json")])
    with pytest.raises(SMPDFormatError) as err:
        read_split(root, "train")
    msg = str(err.value)
    assert f"{META}.zip" in msg and f"{META}/train_label.txt" in msg and "backup/old/train_label.txt" in msg


def test_zip_with_metadata_spread_over_folders_is_refused(tmp_path):
    root = _zip_root(tmp_path, extra=[("elsewhere/train_label.txt", "train_label.txt")], drop=("train_label.txt",))
    with pytest.raises(SMPDFormatError, match="unexpected members.*elsewhere/train_label.txt"):
        read_split(root, "train")


def test_two_aliases_for_one_file_are_refused(tmp_path):
    root = raw_dir(tmp_path)
    shutil.copy(root / META / "train_text.json", root / META / "train_tags.json")
    with pytest.raises(SMPDFormatError, match="train_text.json and train_tags.json are both candidates for 'text'"):
        read_split(root, "train")


@pytest.mark.parametrize("zipped", [True, False])
def test_bytes_read_per_member_are_capped(tmp_path, zipped):
    root = _zip_root(tmp_path) if zipped else raw_dir(tmp_path)
    assert len(read_split(root, "train", max_member_bytes=10**6)) == 30
    with pytest.raises(SMPDFormatError) as err:
        read_split(root, "train", max_member_bytes=5000)
    msg = str(err.value)
    assert "train_user_data.json" in msg and "cap of 5000 bytes" in msg, msg


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_corrupt_zip_member_names_archive_and_member(tmp_path, compression):
    root = _zip_root(tmp_path, compression=compression)
    zpath = root / f"{META}.zip"
    with zipfile.ZipFile(zpath) as zf:
        info = zf.getinfo(f"{META}/train_category.json")
    data = bytearray(zpath.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # the member's data
    for k in range(start + 20, start + 60):
        data[k] ^= 0x5A
    zpath.write_bytes(bytes(data))
    with pytest.raises(SMPDFormatError) as err:
        read_split(root, "train")
    msg = str(err.value)
    assert str(zpath) in msg and f"{META}/train_category.json" in msg, msg


def test_prepare_manifest_counts_outside_images_and_repairs(tmp_path):
    from popstack.pipeline.layout import RunLayout
    from popstack.pipeline.stages import StageContext, prepare
    from tests.helpers import compose_fast

    root = raw_dir(tmp_path)
    posts = read_smpd(root)
    _retarget(root, 0, "../" + posts.image_relpath[0])
    i = _geo_row(root)
    _set_raw(root, "train_temporalspatial_information.json", i, "Latitude", '"123.0"')
    cfg = compose_fast(tmp_path, "data=smpd", f"data.root={root}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    counts = prepare.run(StageContext(cfg, RunLayout(run_dir))).counts
    assert counts["images_outside_root"] == 1
    assert counts["repaired_latitude"] == 1 and counts["repaired_values"] == 1
    assert read_posts(run_dir / "posts.parquet").image_status[0] == IMAGE_OUTSIDE
