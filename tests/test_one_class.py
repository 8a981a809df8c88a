"""Posts of one kind (a single subcategory, e.g. a user's table without a category column): the modules that
classify (``min_classes``) are skipped with one log line, every other stage runs, and new posts follow the run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import compose_fast


def test_a_classifying_module_needs_two_classes():
    from popstack.pipeline.neural import class_skipped, enabled_modules

    cfg = compose_fast(Path("/tmp/unused"))
    assert "prompt_prototype" in enabled_modules(cfg)  # classes unknown: the config decides
    assert "prompt_prototype" in enabled_modules(cfg, classes=2)
    assert "prompt_prototype" not in enabled_modules(cfg, classes=1)
    assert "hierarchical" in enabled_modules(cfg, classes=1)  # regressors need no class
    assert class_skipped(cfg, 1) == ["prompt_prototype"] and class_skipped(cfg, 20) == []


@pytest.mark.slow
def test_one_subcategory_runs_every_stage_without_the_prompt_module(tmp_path, caplog):
    """A table without a category column (every post the same subcategory), the default modules."""
    from popstack import train
    from popstack.commands.predict import predict
    from popstack.datamodules.smpd import read_smpd
    from popstack.datamodules.synthetic import generate

    generate(tmp_path / "raw", n_train=120, n_test=40, seed=0, n_subcategories=6)
    posts = read_smpd(tmp_path / "raw")
    table = posts[["post_id", "uid", "postdate", "label", "title", "alltags"]].rename(columns={"alltags": "tags"})
    table.to_csv(tmp_path / "posts.csv", index=False)
    cfg = compose_fast(tmp_path, "data=table", f"data.table.path={tmp_path / 'posts.csv'}", "stacking.pseudo_rounds=0")
    with caplog.at_level(logging.INFO, logger="popstack"):
        train(cfg)
    run = Path(cfg.run_dir)
    lines = [r.getMessage() for r in caplog.records if "subcategor" in r.getMessage() and "skipped" in r.getMessage()]
    assert len(lines) == 1 and "prompt_prototype skipped" in lines[0], lines
    assert not (run / "neural" / "prompt_prototype").exists()
    preds = pd.read_parquet(run / "neural" / "predictions.parquet")
    assert "pred_prompt_prototype" not in preds and "pred_hierarchical" in preds
    final = pd.read_parquet(run / "predictions.parquet")
    assert sorted(final.post_id) == sorted(posts.post_id) and final.prediction.notna().all()
    new = table[posts.split == "test"].drop(columns=["label"])
    new.to_csv(tmp_path / "new.csv", index=False)
    result = predict(run, tmp_path / "new.csv", tmp_path / "out.parquet", work_dir=tmp_path / "work")
    test_ids = new.post_id
    np.testing.assert_allclose(result.set_index("post_id").loc[test_ids, "popularity_score"].to_numpy(),
                               final.set_index("post_id").loc[test_ids, "prediction"].to_numpy(), rtol=1e-4, atol=1e-4)
