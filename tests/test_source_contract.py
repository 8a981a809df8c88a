"""Contract of every registered data source (``datamodules.sources``): the synthetic posts written in the source's
own form (``DataSource.write_example``) read back as the same posts table, by ``post_id``, for every column the
source carries; the config composes from ``configs/data/<kind>.yaml`` with the overrides the source returns; the
table passes the schema check; new posts (``labels=False``) come without labels; the fingerprinted inputs exist.
No source is named here: a new file in ``datamodules/sources/`` is tested by adding it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from popstack.datamodules.schema import COLUMNS, IMAGE_OK, KEY, LABEL, VECTOR_COLUMNS
from popstack.datamodules.sources import check_posts, get_source, sources
from tests.helpers import compose_fast

KINDS = sorted(sources())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A small synthetic SMPD directory (both splits, some images missing) and its posts table."""
    from popstack.datamodules.smpd import read_smpd
    from popstack.datamodules.synthetic import generate

    raw = tmp_path_factory.mktemp("synthetic") / "raw"
    generate(raw, n_train=40, n_test=12, seed=3, n_subcategories=4)
    return raw, read_smpd(raw)


def _same(column: str, got: pd.Series, want: pd.Series) -> None:
    if column in VECTOR_COLUMNS:
        for g, w in zip(got, want):
            assert (g is None) == (w is None), column
            if w is not None:
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=column)
    elif want.dtype.kind == "f":
        np.testing.assert_array_equal(got.to_numpy(dtype=float), want.to_numpy(dtype=float), err_msg=column)
    else:
        assert got.tolist() == want.tolist(), column


def _read_back(kind: str, synthetic, tmp_path: Path, labels: bool = True):
    raw, posts = synthetic
    source = get_source(kind)
    overrides = source.write_example(posts, raw, tmp_path / "example")
    cfg = compose_fast(tmp_path, *overrides)
    assert cfg.data.kind == kind
    source.check(cfg.data)
    where = source.locate(cfg.data)
    return source, cfg, where, source.read(cfg.data, where, labels=labels)


@pytest.mark.parametrize("kind", KINDS)
def test_source_reads_the_synthetic_posts_written_in_its_own_form(kind, synthetic, tmp_path):
    source, cfg, where, got = _read_back(kind, synthetic, tmp_path)
    want = synthetic[1]
    assert list(got.columns[:len(COLUMNS)]) == list(COLUMNS)
    assert sorted(got[KEY]) == sorted(want[KEY])
    assert set(source.carries) >= {KEY, "uid", "split", "postdate", LABEL, "title", "alltags"}
    got, want = got.set_index(KEY).loc[want[KEY]].reset_index(), want
    for column in source.carries:
        _same(column, got[column], want[column])
    ok = got[got.image_status == IMAGE_OK]
    assert len(ok) and all((source.image_root(where) / rel).is_file() for rel in ok.image_relpath)


@pytest.mark.parametrize("kind", KINDS)
def test_new_posts_come_without_labels_and_inputs_are_files(kind, synthetic, tmp_path):
    source, cfg, where, got = _read_back(kind, synthetic, tmp_path, labels=False)
    assert len(got) == len(synthetic[1]) and got[LABEL].isna().all()
    folder, files = source.inputs(cfg.data, where)
    assert folder.is_dir()
    if files is not None:
        assert files and all((folder / name).is_file() for name in files if not name.endswith(".jpg"))


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_has_a_config_file_and_a_typed_section(kind):
    from dataclasses import fields, is_dataclass

    from popstack.datamodules.config import DataConfig
    from popstack.pipeline.config import CONFIG_DIR

    assert (CONFIG_DIR / "data" / f"{kind}.yaml").is_file()
    assert is_dataclass(get_source(kind).Config)
    assert kind in {f.name for f in fields(DataConfig)}


def test_the_posts_check_refuses_a_table_off_the_schema(synthetic):
    from popstack.datamodules.sources import DataSourceError

    posts = synthetic[1]
    with pytest.raises(DataSourceError, match="duplicate post_id"):
        check_posts(pd.concat([posts, posts.iloc[:1]], ignore_index=True), Path("x"))
    with pytest.raises(DataSourceError, match="lacks"):
        check_posts(posts.drop(columns=["title"]), Path("x"))
    with pytest.raises(DataSourceError, match="'postdate' is float64"):
        check_posts(posts.assign(postdate=posts.postdate.astype(float)), Path("x"))
