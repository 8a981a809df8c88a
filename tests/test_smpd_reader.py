"""The real-SMPD reader on small generated directories: both name sets, both user variants, zips, bad input."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest

from datamodules.schema import COLUMNS, IMAGE_MISSING, IMAGE_OK
from datamodules.smpd import SMPDFormatError, read_posts, read_smpd, read_split, vector_matrix, write_posts
from datamodules.synthetic import generate, make_posts


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
])
def test_bad_input_names_file_row_field(tmp_path, breaker, expected):
    root = raw_dir(tmp_path)
    breaker(root)
    with pytest.raises(SMPDFormatError) as err:
        read_smpd(root)
    for piece in expected:
        assert piece in str(err.value), (piece, str(err.value))


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
