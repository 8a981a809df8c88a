"""W&B in offline mode: one run per stage that runs (none on a rerun), artifacts from the run that made them under
per-run names, a predictor artifact that restores a Predictor; group, tags and the offline fallback line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.helpers import compose_fast


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A debug run logged to W&B offline; returns (run dir, config, the pipeline's tracker)."""
    import os

    from popstack.pipeline.driver import Pipeline

    os.environ["WANDB_MODE"] = "offline"
    tmp = tmp_path_factory.mktemp("tracked")
    cfg = compose_fast(tmp, "logger=wandb_offline")
    pipeline = Pipeline(cfg)
    pipeline.run()
    return Path(cfg.run_dir), cfg, pipeline.tracker


@pytest.mark.slow
def test_one_run_per_stage_and_fold_and_a_rerun_adds_none(tracked_run):
    from popstack import train

    run_dir, cfg, tracker = tracked_run
    runs = _offline_runs(run_dir)
    # six stages, two models x folds (the prompt/prototype module has no popularity head: no fold models), its F model
    assert len(runs) == 6 + 2 * cfg.n_folds + 1
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == len(runs), "every run has its own id"
    train(cfg)  # every stage finished: skipped, so no W&B run at all
    assert _offline_runs(run_dir) == runs


@pytest.mark.slow
def test_artifacts_are_named_per_run_and_logged_by_their_maker(tracked_run):
    run_dir, cfg, tracker = tracked_run
    group = f"{cfg.name}-{run_dir.name}"
    folds = {f"{m}-fold{k}" for m in ("co_attention", "hierarchical") for k in range(cfg.n_folds)}
    assert set(tracker.logged) == folds | {"predictor", "submission", "report"}
    assert all(art.name == f"{group}-{what}" for what, art in tracker.logged.items())
    ckpt = tracker.logged["co_attention-fold1"]
    assert list(ckpt.manifest.entries) == ["neural/co_attention/fold1/checkpoints/best.ckpt"]
    staged = list((run_dir / "wandb" / "data").rglob("*"))
    assert any(p.is_file() for p in staged), "artifacts must be staged inside the run directory"


@pytest.mark.slow
def test_the_predictor_artifact_restores_a_predictor_that_predicts_identically(tracked_run, tmp_path):
    from popstack.pipeline.inference import Predictor, predictor_files
    from popstack.pipeline.tracking import build_artifact

    run_dir, cfg, tracker = tracked_run
    posts = pd.read_parquet(run_dir / "posts.parquet")
    frame = posts[posts.split == "test"].rename(columns={"image_relpath": "image_path"}).drop(columns=["label"])
    expected = Predictor.from_run_dir(run_dir, progress_bar=False).predict(frame, image_root=cfg.data.root,
                                                                          work_dir=tmp_path / "w0")
    logged = Predictor.from_artifact(tracker.logged["predictor"], root=tmp_path / "logged", progress_bar=False)
    built = build_artifact("p", "model", predictor_files(run_dir, cfg), run_dir)  # a wandb.Artifact built offline
    for i, predictor in enumerate([logged, Predictor.from_artifact(built, root=tmp_path / "built"),
                                   Predictor.from_artifact(tmp_path / "built")]):  # and its downloaded folder
        got = predictor.predict(frame, image_root=cfg.data.root, work_dir=tmp_path / f"w{i + 1}")
        np.testing.assert_array_equal(got.popularity_score.to_numpy(), expected.popularity_score.to_numpy())
    assert not (tmp_path / "built" / "posts.parquet").exists(), "the artifact holds only what inference needs"


@pytest.mark.slow
def test_evaluate_is_a_leaderboard_of_members_and_blend(tracked_run, tmp_path):
    from popstack.pipeline.inference import Predictor
    from popstack.stacking.metrics import mae, src

    run_dir, cfg, _ = tracked_run
    predictor = Predictor.from_run_dir(run_dir, progress_bar=False)
    posts = pd.read_parquet(run_dir / "posts.parquet").rename(columns={"image_relpath": "image_path"})
    board = predictor.evaluate(posts, image_root=cfg.data.root, work_dir=tmp_path / "a")
    members = set(OmegaConf.load(run_dir / "stack" / "model" / "stack.json")["members"])
    assert set(board.member) == members | {"blend"} and board.src.is_monotonic_decreasing
    labelled = posts.label.notna()
    assert (board.posts == int(labelled.sum())).all()
    per_post = board.attrs["predictions"].set_index("post_id").loc[posts.post_id[labelled]]
    y = posts.label[labelled].to_numpy()
    blend = board.set_index("member").loc["blend"]
    assert blend.src == pytest.approx(src(y, per_post.popularity_score.to_numpy()))
    assert blend.mae == pytest.approx(mae(y, per_post.popularity_score.to_numpy()))
    # the directory form reads the labels from train_label.txt: the same leaderboard
    from_dir = predictor.evaluate(cfg.data.root, work_dir=tmp_path / "b")
    pd.testing.assert_frame_equal(from_dir, board, check_exact=False, atol=1e-6)


@pytest.mark.slow
def test_per_member_predictions_blend_to_the_score(tracked_run, tmp_path):
    import json

    from popstack.pipeline.inference import Predictor
    from popstack.stacking.blend import blend

    run_dir, cfg, _ = tracked_run
    posts = pd.read_parquet(run_dir / "posts.parquet")
    frame = posts[posts.split == "test"].rename(columns={"image_relpath": "image_path"}).drop(columns=["label"])
    predictor = Predictor.from_run_dir(run_dir, progress_bar=False)
    got = predictor.predict(frame, image_root=cfg.data.root, work_dir=tmp_path / "m", members=True)
    plain = predictor.predict(frame, image_root=cfg.data.root, work_dir=tmp_path / "p")
    np.testing.assert_allclose(got.popularity_score, plain.popularity_score, rtol=1e-6)  # the same blend
    stack = json.loads((run_dir / "stack" / "model" / "stack.json").read_text())
    assert list(got.columns) == ["post_id", "split", "popularity_score", *stack["members"]]
    if len(stack["folds"]) == 1:  # one fold: the blend of the member columns is the score
        P = got[stack["members"]].to_numpy()
        np.testing.assert_allclose(blend(P, stack["blend"][str(stack["folds"][0])]), got.popularity_score)
    assert got[stack["members"]].notna().all().all()


def test_sweep_jobs_get_their_own_group_and_overrides_become_tags(tmp_path):
    from popstack.pipeline.tracking import group_name, init_settings

    cfg = compose_fast(tmp_path, "logger=wandb_offline")
    assert group_name(cfg, tmp_path / "multirun-A" / "0") != group_name(cfg, tmp_path / "multirun-B" / "0")
    assert group_name(cfg, tmp_path / "2026-01-01_00-00-00") == f"{cfg.name}-2026-01-01_00-00-00"
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- debug=fast\n- trainer=gpu\n- hydra.run.dir=/x\n- data.root=/data/smpd\n- model.co_attention.lr=0.001\n"
        "- +logger.wandb.api_key=abc\n")
    tags = init_settings(cfg, run_dir, environ={"WANDB_TAGS": "team"})["tags"]
    assert tags == ["debug=fast", "trainer=gpu", "model.co_attention.lr=0.001", "team"]


def test_online_without_a_key_falls_back_to_offline_in_one_line(tmp_path, monkeypatch, caplog):
    from popstack.pipeline.tracking import init_settings

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = compose_fast(tmp_path, "logger=wandb")
    with caplog.at_level(logging.WARNING, logger="popstack"):
        settings = init_settings(cfg, tmp_path / "run", environ={})
    assert settings["mode"] == "offline"
    (line,) = [r.getMessage() for r in caplog.records]
    assert "no API key" in line and "wandb sync" in line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="popstack"):
        assert init_settings(cfg, tmp_path / "run", environ={"WANDB_API_KEY": "x" * 40})["mode"] == "online"
    assert not caplog.records


def test_a_fold_run_summarises_the_checkpoint_used(tmp_path, monkeypatch):
    """``define_metric`` + ``best/<monitor>``: the fold run's summary is the checkpoint's score, not the last
    epoch's."""
    from popstack.pipeline.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_fast(tmp_path, "logger=wandb_offline")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    tracker = Tracker(cfg, run_dir)
    seen = {}
    done = tracker.fold_done

    def spy(run, *args):
        done(run, *args)
        seen.update(dict(run.summary))

    monkeypatch.setattr(tracker, "fold_done", spy)
    try:
        tracker.start("neural")
        from popstack.pipeline.training import fit_resumable
        from tests.test_ecosystem import TinyData, TinyRegressor

        fit_resumable(TinyRegressor(), TinyData(), run_dir / "neural" / "m" / "fold0", wandb_prefix="m/fold0",
                      trainer_cfg=OmegaConf.to_container(cfg.trainer, resolve=True), max_epochs=3,
                      monitor="val/loss", mode="min", seed=0, progress_bar=False)
    finally:
        tracker.finish()
    import json

    done_json = json.loads((run_dir / "neural" / "m" / "fold0" / "done.json").read_text())
    assert seen["best/val/loss"] == pytest.approx(done_json["best_score"])
    assert seen["best/checkpoint"] == "neural/m/fold0/checkpoints/best.ckpt"
    assert "m-fold0" in tracker.logged
