"""``data=table`` (``datamodules/sources/table.py``): the user's own posts from a CSV or Parquet file. What the
contract tests (``tests/test_source_contract.py``) do not cover: the errors naming file, row and column, the
defaults of absent fields, the extra columns, and a whole ``train.py`` run on a CSV without images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from popstack.datamodules.config import DataConfig
from popstack.datamodules.sources import DataSourceError, get_source
from tests.helpers import run_cli

SOURCE = get_source("table")


def _data(path: Path, **table) -> OmegaConf:
    data = OmegaConf.structured(DataConfig)
    data.kind, data.table.path = "table", str(path)
    for key, value in table.items():
        OmegaConf.update(data, f"table.{key}", value, merge=False)
    return data


def _read(tmp_path: Path, text: str, name: str = "posts.csv", **table) -> pd.DataFrame:
    path = tmp_path / name
    path.write_text(text)
    data = _data(path, **table)
    SOURCE.check(data)
    return SOURCE.read(data, SOURCE.locate(data))


def test_a_minimal_csv_reads_with_the_smpd_defaults_for_absent_fields(tmp_path):
    posts = _read(tmp_path, "post_id,uid,postdate,label,title,tags\n"
                            "007,u1,2015-03-01,3.5,Sunset,sun sea\n"
                            "8,u2,1425168000,,,\n"
                            "9,u1,2015-03-01T12:00:00+01:00,1.0,x,\n")
    assert posts.post_id.tolist() == ["007", "9", "8"]  # ids as text; train rows first, file order kept
    assert posts.split.tolist() == ["train", "train", "test"] and posts.row.tolist() == [0, 1, 0]
    assert posts.postdate.tolist() == [1425168000, 1425207600, 1425168000]
    assert np.isnan(posts.label.iloc[2]) and posts.alltags.tolist() == ["sun sea", "", ""]
    assert posts.latitude.isna().all() and (posts.geoaccuracy == 0).all() and posts.user_vector.isna().all()
    assert (posts.category == "").all() and posts.pathalias.isna().all()
    assert (posts.image_status == "missing").all()


@pytest.mark.parametrize("text, table, says", [
    ("id,uid,postdate\n1,u,2015-01-01\n", {}, "no column 'post_id' (data.table.columns.post_id)"),
    ("post_id,uid,postdate\n1,u,2015-01-01\n", {"columns.title": "Title"}, "no column 'Title'"),
    ("post_id,uid,postdate\n1,u,2015-01-01\n2,u,someday\n", {}, "row 1 (line 3), column 'postdate': 'someday'"),
    ("post_id,uid,postdate\n1,u,1990-01-01\n", {}, "column 'postdate': '1990-01-01' is not a date in [2004"),
    ("post_id,uid,postdate,label\n1,u,2015-01-01,many\n", {}, "row 0 (line 2), column 'label': 'many' is not a num"),
    ("post_id,uid,postdate,views\n1,u,2015-01-01,inf\n", {"columns.label": "views"}, "column 'views': 'inf' is not a "
     "finite number"),
    ("post_id,uid,postdate\n1,u,2015-01-01\n1,v,2015-01-02\n", {}, "duplicate post_id '1' (row 0 (line 2) and row 1"),
    ("post_id,uid,postdate\n,u,2015-01-01\n", {}, "row 0 (line 2), column 'post_id': '' is not an id"),
    ("post_id,uid,postdate,split\n1,u,2015-01-01,val\n", {}, "column 'split': 'val' is not one of train, test"),
    ("post_id,uid,postdate\n1,u,2015-01-01\n", {"extra_numeric": ["likes"]}, "no column 'likes' (data.table.extra_n"),
    ("post_id,uid,postdate,d\n1,u,2015-01-01,x\n", {"extra_numeric": ["d"]}, "column 'd': 'x' is not a number"),
    ("post_id,uid,postdate,d\n1,u,2015-01-01,x\n", {"extra_numeric": ["d"], "extra_categorical": ["d"]},
     "'d' is in both"),
])
def test_bad_tables_are_one_error_naming_file_row_and_column(tmp_path, text, table, says):
    with pytest.raises(DataSourceError) as err:
        _read(tmp_path, text, **table)
    assert str(err.value).startswith(str(tmp_path / "posts.csv")) and says in str(err.value), err.value


def test_parquet_with_mapped_columns_extras_and_confined_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"\xff\xd8 not empty")
    frame = pd.DataFrame({"id": [1, 2, 3], "user": ["u", "u", "v"], "when": pd.to_datetime(["2015-01-01"] * 3),
                          "views": [2.0, None, 1.0], "pic": ["img/a.jpg", "../outside.jpg", "img/none.jpg"],
                          "followers": [10, None, 3], "device": ["ios", None, "web"]})
    frame.to_parquet(tmp_path / "p.parquet")
    data = _data(tmp_path / "p.parquet", **{"columns.post_id": "id", "columns.uid": "user", "columns.postdate": "when",
                                           "columns.label": "views", "columns.image_path": "pic",
                                           "extra_numeric": ["followers"], "extra_categorical": ["device"]})
    posts = SOURCE.read(data, SOURCE.locate(data))
    assert posts.post_id.tolist() == ["1", "3", "2"]
    assert posts.image_status.tolist() == ["ok", "missing", "outside_root"]
    assert posts.extra_num__followers.tolist()[:2] == [10.0, 3.0] and np.isnan(posts.extra_num__followers.iloc[2])
    assert posts.extra_cat__device.tolist() == ["ios", "web", ""]
    folder, files = SOURCE.inputs(data, SOURCE.locate(data))
    assert folder == tmp_path.resolve() and set(files) == {"p.parquet", "img/a.jpg", "img/none.jpg"}


def test_a_bad_table_on_the_command_line_is_one_error_line(tmp_path):
    (tmp_path / "p.csv").write_text("post_id,uid,postdate,label\n1,u,2015-01-01,lots\n")
    done = run_cli("train.py", "data=table", f"data.table.path={tmp_path / 'p.csv'}", "debug=fast",
                   f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("error: ") and "column 'label'" in lines[-1], done.stderr


@pytest.mark.slow  # one debug=fast train.py run and one predict.py
def test_train_on_a_csv_without_images_predicts_every_post(tmp_path):
    """The synthetic posts as a CSV (no image column, an extra number and category): ``train.py data=table``
    runs, every post gets one prediction, the extra columns are features; ``predict.py`` reads a CSV too."""
    from popstack.datamodules.smpd import read_smpd
    from popstack.datamodules.synthetic import generate

    generate(tmp_path / "raw", n_train=120, n_test=40, seed=0, n_subcategories=6)
    posts = read_smpd(tmp_path / "raw")
    table = posts[["post_id", "uid", "postdate", "label", "title", "alltags", "category", "subcategory", "concept",
                   "latitude", "longitude", "geoaccuracy", "photo_count", "ispro"]].rename(columns={"alltags": "tags"})
    table["followers"] = posts["photo_count"].fillna(0) * 3 + 1
    table["device"] = np.where(posts["ispro"] == 1, "pro", "free")
    table.to_csv(tmp_path / "posts.csv", index=False)
    run = tmp_path / "run"
    done = run_cli("train.py", "data=table", f"data.table.path={tmp_path / 'posts.csv'}", "debug=fast",
                   "data.table.extra_numeric=[followers]", "data.table.extra_categorical=[device]",
                   f"hydra.run.dir={run}", timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    preds = pd.read_parquet(run / "predictions.parquet")
    assert sorted(preds.post_id) == sorted(posts.post_id) and preds.post_id.is_unique
    assert len(json.loads((run / "submission.json").read_text())["result"]) == (posts.split == "test").sum()
    schema = json.loads((run / "features" / "schema.json").read_text())
    assert {c for c, f in schema["families"].items() if f == "extra"} == {"extra__followers", "extra__device"}
    assert "extra__device" in schema["categorical"]
    new = table[posts.split == "test"].drop(columns=["label"]).head(7)
    new.to_csv(tmp_path / "new.csv", index=False)
    done = run_cli("predict.py", str(run), str(tmp_path / "new.csv"), "--out", str(tmp_path / "new.parquet"),
                   timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = pd.read_parquet(tmp_path / "new.parquet")
    assert scored.post_id.tolist() == new.post_id.astype(str).tolist() and scored.popularity_score.notna().all()
