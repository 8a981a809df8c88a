"""Correct results: every F column means the same thing in every row, whichever fold model produced it;
the papers' own settings run; held-back posts are scored but never fitted on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datamodules.folds import read_folds
from datamodules.schema import KEY, LABEL, NO_FOLD
from pipeline.layout import RunLayout
from tests.helpers import compose_fast

#: Each F column computed by two fold models for the same posts must correlate at least this much (Pearson, over
#: the posts). r = 0.8 means r^2 = 0.64: most of a column's variance is shared between the fold models, so a tree
#: split learnt on one fold model's rows cuts the other fold models' rows in nearly the same place.
MIN_FOLD_CORRELATION = 0.8

#: The CMPA-DGPL paper's settings on the debug data: the prompt/prototype module alone, without a popularity head
#: (eq. 8: L_g + L_o + L_c), loss-based selection keeping 77%, no TabNet (keeps the run short).
PAPER_SETTINGS = ("model.co_attention.enabled=false", "model.hierarchical.enabled=false",
                  "model.prompt_prototype.regression_weight=0", "model.prompt_prototype.epochs=2",
                  "stacking.selection_fraction=0.77", "stacking.members.tabnet.enabled=false",
                  "data.synthetic.n_train=160", "features.sentence_model=''")


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    """The whole pipeline with ``PAPER_SETTINGS`` (2 folds, 2 epochs, a 10% held-back slice)."""
    from train import train

    cfg = compose_fast(tmp_path_factory.mktemp("correct"), *PAPER_SETTINGS)
    metrics = train(cfg)
    return Path(cfg.run_dir), cfg, metrics


@pytest.fixture(scope="module")
def fold_frames(prompt_run) -> dict[int, pd.DataFrame]:
    run_dir, cfg, _ = prompt_run
    return per_fold_frames(run_dir, cfg)


def per_fold_frames(run_dir: Path, cfg) -> dict[int, pd.DataFrame]:
    """Every post's prompt/prototype outputs from each fold's checkpoint, as the extract stage computes them."""
    from pipeline.neural import cache_datamodule, checkpoints, predict_frames

    run = RunLayout(run_dir)
    post_ids = read_folds(run.folds)[KEY].tolist()
    dm = cache_datamodule(cfg, run, "prompt_prototype", None)
    return predict_frames(cfg, dm, run_dir / "check", checkpoints(cfg, run, "prompt_prototype"),
                          "prompt_prototype", post_ids)


@pytest.mark.slow
def test_every_f_column_agrees_between_fold_models(fold_frames):
    from pipeline.neural import PROMPT_BLOCKS

    frames = fold_frames
    f_cols = [c for c in frames[0].columns if c not in (KEY, "prediction", "class_loss")]
    assert f_cols and all(c.rsplit("_", 1)[0] in PROMPT_BLOCKS for c in f_cols)
    corr = {c: np.corrcoef(frames[0][c], frames[1][c])[0, 1] for c in f_cols}
    worst = min(corr, key=corr.get)
    assert corr[worst] >= MIN_FOLD_CORRELATION, f"{worst}: r = {corr[worst]:.3f} between fold models"


@pytest.mark.slow
def test_test_rows_get_f_the_way_out_of_fold_rows_do(prompt_run, fold_frames):
    """A post without a fold gets the mean of the fold models' aligned outputs; a post with a fold, its own
    held-out model's aligned output: both on one scale, so the mean-style value of a labelled post tracks its
    out-of-fold value column by column."""
    from lightning_modules.extract import align_fold_outputs, oof_and_test
    from pipeline.neural import PROMPT_BLOCKS, load_extract_state

    run_dir, cfg, _ = prompt_run
    frames = fold_frames
    cols = [c for c in frames[0].columns if c.rsplit("_", 1)[0] in PROMPT_BLOCKS]
    saved = load_extract_state(RunLayout(run_dir).extract_state)["align.prompt_prototype"]
    aligned = align_fold_outputs(frames, cols, saved)  # the training run's statistics, as predict.py uses them
    folds = read_folds(run_dir / "folds.parquet")
    oof = oof_and_test(aligned, folds)
    everyone_unlabelled = folds.assign(fold=NO_FOLD)
    mean_style = oof_and_test(aligned, everyone_unlabelled)
    in_fold = folds.fold.to_numpy() != NO_FOLD
    for c in cols:
        a, b = oof.loc[in_fold, c].to_numpy(), mean_style.loc[in_fold, c].to_numpy()
        assert np.corrcoef(a, b)[0, 1] >= MIN_FOLD_CORRELATION, c
        assert abs(a.mean() - b.mean()) <= 0.25 * a.std(), c  # same location: no per-fold offset left
    # and the extract stage wrote exactly these values (before PCA) for the posts without a fold
    unl = ~in_fold
    np.testing.assert_allclose(oof.loc[unl, cols].to_numpy(),
                               np.mean([aligned[k].set_index(KEY).loc[folds[KEY][unl], cols].to_numpy()
                                        for k in aligned], axis=0), rtol=1e-6)


@pytest.mark.slow
def test_class_loss_written_out_of_fold(prompt_run):
    run_dir, _, _ = prompt_run
    loss = pd.read_parquet(run_dir / "neural" / "class_loss.parquet")
    folds = read_folds(run_dir / "folds.parquet")
    assert loss[KEY].tolist() == folds[KEY].tolist()
    assert np.isfinite(loss.class_loss[folds.fold != NO_FOLD]).mean() > 0.9


@pytest.mark.slow
def test_paper_settings_run_end_to_end_without_a_prediction_column(prompt_run, caplog):
    run_dir, cfg, metrics = prompt_run
    preds = pd.read_parquet(run_dir / "neural" / "predictions.parquet")
    assert list(preds.columns) == [KEY]  # no head: F only, no all-NaN member
    scores = pd.read_csv(run_dir / "stack" / "scores.csv")
    assert "pred_prompt_prototype" not in set(scores.member) and scores[["src", "mae"]].notna().all().all()
    assert np.isfinite(metrics["report"]["src"]) and np.isfinite(metrics["report"]["heldback_src"])


@pytest.mark.slow
def test_report_shows_fold_strategy_and_held_back_scores(prompt_run):
    run_dir, cfg, metrics = prompt_run
    text = (run_dir / "report.md").read_text()
    assert "Fold strategy **time**" in text and "Held-back chronological slice" in text
    header = next(line for line in text.splitlines() if line.startswith("| member"))
    assert header.split(" | ")[1:5] == ["oof_src", "oof_mae", "heldback_src", "heldback_mae"]
    folds = read_folds(run_dir / "folds.parquet")
    posts = pd.read_parquet(run_dir / "posts.parquet", columns=[KEY, LABEL])
    held = folds.holdout.to_numpy()
    assert held.sum() == 16 and posts[LABEL][held].notna().all()  # 10% of 160 labelled posts
    # the held-back posts are treated like test posts everywhere: never in a fit, fold-mean predictions
    stack_preds = pd.read_parquet(run_dir / "stack" / "predictions.parquet")
    from stacking.metrics import scores

    expected = scores(posts[LABEL][held].to_numpy(), stack_preds.prediction[held].to_numpy())
    assert metrics["report"]["heldback_mae"] == pytest.approx(expected["mae"])


def test_experiment_configs_carry_the_papers_settings():
    from pipeline.config import compose_config

    cmpa = compose_config(["experiment=cmpa_dgpl"], validate=False)  # data.root and the GPU come at run time
    assert cmpa.model.prompt_prototype.regression_weight == 0 and cmpa.stacking.selection_fraction == 0.77
    hyper = compose_config(["experiment=hyperfusion"], validate=False)
    assert hyper.model.extract.pca_dim == 0  # CLIP embeddings at full width
    cb = hyper.stacking.members.catboost
    assert cb.learning_rate <= 0.03 and cb.iterations >= 10000 and cb.early_stopping_rounds > 0
    assert "glove_path" in hyper.features
