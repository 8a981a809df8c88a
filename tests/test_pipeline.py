"""train.py and predict.py end to end on the debug config: outputs, resume, inference, CLI errors, configs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import ROOT, compose_fast, run_cli

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
#: Any experiment on the demo's data, backbone and CPU, small enough for a test.
FAST_EXPERIMENT = ("data=synthetic", "backbone=tiny", "trainer=cpu", "stacking.members.tabnet.max_epochs=1",
                   "stacking.pseudo_rounds=0")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One full debug run, shared by the tests that only read its outputs; TabNet (opt-in) on, so saving, reloading
    and predicting cover every member kind."""
    from popstack import train

    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = compose_fast(tmp, "stacking.members.tabnet.enabled=true")
    metrics = train(cfg)
    return Path(cfg.run_dir), cfg, metrics


@pytest.mark.slow
def test_train_writes_every_output(finished_run):
    run_dir, cfg, metrics = finished_run
    for rel in ("config.yaml", "posts.parquet", "folds.parquet", "vocab.json", "features/features.parquet",
                "embeddings/image_emb.npy", "neural/predictions.parquet", "stack/model/stack.json",
                "submission.json", "predictions.parquet", "report.md", "prediction_distribution.png",
                "feature_importance.png"):
        assert (run_dir / rel).exists(), rel
    sub = json.loads((run_dir / "submission.json").read_text())
    posts = pd.read_parquet(run_dir / "posts.parquet")
    test_ids = posts.loc[posts.split == "test"].sort_values("row").post_id
    assert [r["post_id"] for r in sub["result"]] == [f"post{p}" for p in test_ids]
    assert set(sub) == {"version", "result", "external_data"}
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    assert preds.post_id.tolist() == posts.post_id.tolist() and preds.prediction.notna().all()
    for name in ("co_attention", "hierarchical"):
        for fold in range(cfg.n_folds):
            ckpt = run_dir / "neural" / name / f"fold{fold}" / "checkpoints" / "best.ckpt"
            torch.load(ckpt, weights_only=True)
    torch.load(run_dir / "neural" / "prompt_prototype" / "features" / "checkpoints" / "best.ckpt", weights_only=True)
    assert not (run_dir / "neural" / "prompt_prototype" / "fold0").exists()  # no popularity head by default
    assert "src" in metrics["report"]


@pytest.mark.slow
def test_rerun_skips_finished_stages(finished_run, caplog):
    from popstack import train

    run_dir, cfg, _ = finished_run
    before = (run_dir / "submission.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="popstack"):
        train(cfg)
    assert sum("skipped" in r.message for r in caplog.records) == 6
    assert (run_dir / "submission.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_predict_matches_train_on_the_same_posts(finished_run, tmp_path):
    from popstack.commands.predict import predict

    run_dir, cfg, _ = finished_run
    raw = Path(cfg.data.root)
    result = predict(run_dir, raw, tmp_path / "out.parquet", work_dir=tmp_path)
    posts = pd.read_parquet(run_dir / "posts.parquet")
    assert result.post_id.tolist() == posts.post_id.tolist() and result.post_id.is_unique
    trained = pd.read_parquet(run_dir / "predictions.parquet").set_index("post_id")
    test_ids = posts.post_id[posts.split == "test"]
    got = result.set_index("post_id").loc[test_ids, "popularity_score"].to_numpy()
    np.testing.assert_allclose(got, trained.loc[test_ids, "prediction"].to_numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_predictor_dataframe_api_matches_the_directory(finished_run, tmp_path):
    """Python API: load the run once, predict a DataFrame of posts (image paths) -> scores keyed by post id."""
    from popstack.pipeline.inference import Predictor

    run_dir, cfg, _ = finished_run
    raw = Path(cfg.data.root)
    predictor = Predictor.from_run_dir(run_dir, progress_bar=False)
    posts = pd.read_parquet(run_dir / "posts.parquet")
    test = posts[posts.split == "test"].rename(columns={"image_relpath": "image_path"}).drop(columns=["label"])
    frame = predictor.predict(test.iloc[::-1], image_root=raw, work_dir=tmp_path)  # any order, relative paths
    assert frame.post_id.tolist() == test.post_id.tolist()[::-1]
    trained = pd.read_parquet(run_dir / "predictions.parquet").set_index("post_id")
    np.testing.assert_allclose(frame.set_index("post_id").loc[test.post_id, "popularity_score"].to_numpy(),
                               trained.loc[test.post_id, "prediction"].to_numpy(), rtol=1e-4, atol=1e-4)
    assert frame.attrs["popstack"]["all_images_missing"] is False
    blind = predictor.predict(test.head(5), image_root=tmp_path / "elsewhere", work_dir=tmp_path)
    assert blind.attrs["popstack"]["all_images_missing"] and "warning" in blind.attrs["popstack"]
    assert np.isfinite(blind.popularity_score).all()


@pytest.mark.slow
def test_predict_on_fresh_raw_posts_without_labels(finished_run, tmp_path):
    from popstack.datamodules.synthetic import generate

    run_dir, _, _ = finished_run
    raw = tmp_path / "new"
    generate(raw, 15, 10, seed=11, n_subcategories=8)
    (raw / "train_allmetadata_json" / "train_label.txt").unlink()
    proc = run_cli("predict.py", str(run_dir), str(raw), "--out", str(tmp_path / "new.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "new.json").read_text())["result"]
    assert len(rows) == 25 and len({r["post_id"] for r in rows}) == 25
    assert all(np.isfinite(r["popularity_score"]) for r in rows)
    meta = json.loads((tmp_path / "new.json.meta.json").read_text())
    assert meta["posts"] == 25 and meta["all_images_missing"] is False


@pytest.mark.slow
def _restamp_manifests(run: Path, config: dict) -> None:
    """Record ``config`` in every stage manifest of ``run`` (the consistency check compares them with config.yaml)."""
    from popstack.pipeline.manifest import config_hash
    from popstack.pipeline.stages import STAGES

    for stage in STAGES:
        path = run / "manifests" / f"{stage.name}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            record["config"] = config_hash(stage.config(config))
            path.write_text(json.dumps(record))


def test_a_gpu_run_predicts_on_a_cpu_only_machine(finished_run, tmp_path, caplog, monkeypatch):
    """A run whose config says trainer=gpu (bf16) predicts here: with --accelerator cpu, and with no flag (one
    warning line, then the CPU), both equal to the run's own predictions."""
    import yaml

    from popstack.commands.predict import predict
    from popstack.pipeline.inference import Predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_dir, cfg, _ = finished_run
    gpu_run = tmp_path / "gpu_run"
    shutil.copytree(run_dir, gpu_run)
    config = yaml.safe_load((gpu_run / "config.yaml").read_text())
    config["trainer"].update(yaml.safe_load((ROOT / "configs" / "trainer" / "gpu.yaml").read_text()))
    assert config["trainer"]["accelerator"] == "gpu"
    (gpu_run / "config.yaml").write_text(yaml.safe_dump(config))
    _restamp_manifests(gpu_run, config)  # as if the run had been trained with that trainer section
    posts = pd.read_parquet(run_dir / "posts.parquet")
    trained = pd.read_parquet(run_dir / "predictions.parquet").set_index("post_id")
    raw = Path(cfg.data.root)
    test_ids = posts.loc[posts.split == "test", "post_id"]

    proc = run_cli("predict.py", str(gpu_run), str(raw), "--out", str(tmp_path / "cpu.parquet"), "--accelerator", "cpu",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA" not in proc.stderr
    got = pd.read_parquet(tmp_path / "cpu.parquet").set_index("post_id").loc[test_ids, "popularity_score"]
    np.testing.assert_allclose(got.to_numpy(), trained.loc[test_ids, "prediction"].to_numpy(), rtol=1e-4, atol=1e-4)

    caplog.set_level("WARNING", logger="popstack")
    predictor = Predictor.from_run_dir(gpu_run, progress_bar=False)
    assert predictor.cfg.trainer.accelerator == "cpu" and predictor.cfg.trainer.precision == "32-true"
    fallback = [r for r in caplog.records if "no CUDA" in r.getMessage()]
    assert len(fallback) == 1 and "\n" not in fallback[0].getMessage()
    result = predict(gpu_run, raw, tmp_path / "auto.parquet", work_dir=tmp_path)
    np.testing.assert_allclose(result.set_index("post_id").loc[test_ids, "popularity_score"].to_numpy(),
                               trained.loc[test_ids, "prediction"].to_numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_kill_during_neural_then_resume_equals_uninterrupted(tmp_path):
    args = ["debug=fast", f"paths.root_dir={tmp_path}", "model.prompt_prototype.epochs=3",
            "model.co_attention.epochs=3", "model.hierarchical.epochs=3", "stacking.members.tabnet.enabled=false"]
    ref = run_cli("train.py", *args, f"hydra.run.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={tmp_path}/killed"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "killed" / "neural" / "co_attention" / "fold0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run never reached the neural stage"
    assert not (tmp_path / "killed" / "neural" / "co_attention" / "fold1" / "done.json").exists()
    caught_mid_fit = not (target.parent.parent / "done.json").exists()  # last.ckpt written, fit not finished
    again = run_cli("train.py", *args, f"hydra.run.dir={tmp_path}/killed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[prepare] skipped" in again.stderr and "[features] skipped" in again.stderr
    if caught_mid_fit:
        assert "resuming fold0 from" in again.stderr, again.stderr[-3000:]
    a = pd.read_parquet(tmp_path / "ref" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "killed" / "predictions.parquet")
    np.testing.assert_allclose(a.prediction, b.prediction, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_composes_and_builds_every_stage_config(experiment, tmp_path):
    """Configs cannot rot: each experiment file composes, passes the schema, and every stage builds its config
    section and settings objects from it (modules, features, stacker), without running anything."""
    from omegaconf import OmegaConf

    from popstack.pipeline.neural import enabled_modules
    from popstack.pipeline.stages import STAGES
    from popstack.pipeline.stages.features import feature_config
    from popstack.pipeline.stages.stack import stack_config

    cfg = compose_fast(tmp_path, f"experiment={experiment}", *FAST_EXPERIMENT)
    assert cfg.name == experiment
    c = OmegaConf.to_container(cfg, resolve=True)
    for stage in STAGES:
        assert isinstance(stage.config(c), dict), stage.name
    assert set(enabled_modules(cfg)) <= {"prompt_prototype", "co_attention", "hierarchical"}
    feature_config(cfg)
    scfg = stack_config(cfg, ["pred_x"])
    assert scfg.fitted_members() and set(scfg.fitted_members()) <= set(cfg.stacking.members)
    assert list(tmp_path.iterdir()) == [], "composing a config writes nothing"


@pytest.mark.slow
def test_one_experiment_runs_end_to_end(tmp_path):
    """One experiment other than the default runs through every stage (hyperfusion: no prompt/prototype module,
    raw CLIP blocks, catboost + TabNet, MAE blend, IQR filter)."""
    from popstack import train

    cfg = compose_fast(tmp_path, "experiment=hyperfusion", *FAST_EXPERIMENT)
    metrics = train(cfg)
    assert (Path(cfg.run_dir) / "submission.json").is_file() and np.isfinite(metrics["report"]["src"])


# ------------------------------------------------------------------ command-line errors: one line, exit != 0
# (bad config values and keys: tests/test_config_schema.py, in-process)
def _corrupt_checkpoint(run_dir: Path) -> None:
    ckpt = run_dir / "neural" / "co_attention" / "fold0" / "checkpoints" / "best.ckpt"
    ckpt.write_bytes(b"not a checkpoint")


@pytest.fixture
def run_copy(finished_run, tmp_path):
    run_dir, cfg, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)  # a run directory is self-contained: a plain copy works
    return copy, Path(cfg.data.root)


def _read_only_dir(tmp: Path) -> Path:
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):
        pytest.skip("running as a user that ignores directory permissions")
    return ro


def _under_a_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("x")
    return tmp / "afile"


def _empty_split(tmp: Path) -> Path:
    """A test split whose image list names no posts (every metadata file present and empty)."""
    bad = tmp / "emptysplit" / "test_allmetadata_json"
    bad.mkdir(parents=True)
    (bad / "test_img_filepath.txt").write_text("")
    for name in ("category", "text", "temporalspatial_information", "additional_information"):
        (bad / f"test_{name}.json").write_text("[]")
    (bad / "test_user_data.json").write_text("{}")
    return bad.parent


# case -> (script, arguments from (tmp, run copy, raw data dir), a word the one error line must contain: the
# culprit). ``{tmp}`` etc. are filled in per test; TRAIN is the fast config writing under tmp.
TRAIN = ("debug=fast", "paths.root_dir={tmp}", "hydra.run.dir={tmp}/out")
OUT = ("--out", "{tmp}/p.json")
CLI_ERRORS = {
    "train_missing_data_dir": ("train.py", (*TRAIN, "data=smpd", "data.root={tmp}/nope", "backbone=tiny"),
                               "{tmp}/nope"),
    "train_offline_tag": ("train.py", (*TRAIN, "backbone=vit_b32"), "backbone.pretrained"),
    "train_missing_pretrained_file": ("train.py", (*TRAIN, "backbone.pretrained={tmp}/weights.bin"),
                                      "{tmp}/weights.bin"),
    "train_wrong_layout": ("train.py", (*TRAIN, "data=smpd", "data.root={empty}", "backbone=tiny"), "{empty}"),
    "train_readonly_output": ("train.py", ("debug=fast", "paths.root_dir={tmp}", "hydra.run.dir={ro}/run"), "{ro}"),
    "train_output_under_a_file": ("train.py", ("debug=fast", "paths.root_dir={tmp}", "hydra.run.dir={afile}/run"),
                                  "{afile}"),
    "predict_missing_run": ("predict.py", ("{tmp}/nope", "{raw}", *OUT), "{tmp}/nope"),
    "predict_missing_raw": ("predict.py", ("{run}", "{tmp}/nope", *OUT), "{tmp}/nope"),
    "predict_wrong_layout": ("predict.py", ("{run}", "{empty}", *OUT), "{empty}"),
    "predict_bad_extension": ("predict.py", ("{run}", "{raw}", "--out", "{tmp}/p.xlsx"), "p.xlsx"),
    "predict_corrupt_checkpoint": ("predict.py", ("{run}", "{raw}", *OUT), "best.ckpt"),
    "predict_empty_split": ("predict.py", ("{run}", "{emptysplit}", *OUT), "no posts"),
}
#: What a case needs on disk before the command runs: placeholder -> maker.
SETUPS = {"train_readonly_output": ("ro", _read_only_dir), "train_output_under_a_file": ("afile", _under_a_file),
          "predict_empty_split": ("emptysplit", _empty_split)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_user_errors(case, tmp_path, run_copy):
    """A user mistake ends in one ``error:`` line on stderr naming the culprit, exit status != 0, no traceback."""
    run_dir, raw = run_copy
    script, args, culprit = CLI_ERRORS[case]
    empty = tmp_path / "empty"
    empty.mkdir()
    names = {"tmp": tmp_path, "run": run_dir, "raw": raw, "empty": empty}
    if case in SETUPS:
        name, make = SETUPS[case]
        names[name] = make(tmp_path)
    if case == "predict_corrupt_checkpoint":
        _corrupt_checkpoint(run_dir)
    proc = run_cli(script, *(a.format(**names) for a in args))
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert culprit.format(**names) in lines[0], lines[0]
