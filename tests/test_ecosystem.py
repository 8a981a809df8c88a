"""Fitting the ecosystem: any Trainer flag, early stopping, LR monitor, multirun, --cfg job, W&B settings/artifacts,
predict's --out checks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import compose_fast


class TinyRegressor(L.LightningModule):
    """y = w.x with a large step and large targets, so gradients are large and clipping matters."""

    def __init__(self, constant_val: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.constant_val = constant_val

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def validation_step(self, batch, _):
        x, y = batch
        loss = torch.tensor(1.0) if self.constant_val else torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("val/loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 4, generator=g)
        self.ds = TensorDataset(x, 100 * x.sum(1))

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=16)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=64)


def _fit(tmp_path, name: str, *overrides: str, constant_val: bool = False, patience=None, epochs: int = 1):
    from popstack.pipeline.training import fit_resumable

    cfg = compose_fast(tmp_path, *overrides)
    module = TinyRegressor(constant_val)
    fit_resumable(module, TinyData(), tmp_path / name, trainer_cfg=OmegaConf.to_container(cfg.trainer, resolve=True),
                  max_epochs=epochs, monitor="val/loss", mode="min", seed=0, progress_bar=False,
                  early_stopping_patience=patience)
    return module, tmp_path / name


def test_gradient_clip_from_the_command_line_changes_the_weights(tmp_path):
    plain, _ = _fit(tmp_path, "plain")
    again, _ = _fit(tmp_path, "again")
    clipped, _ = _fit(tmp_path, "clipped", "trainer.gradient_clip_val=0.01")
    assert torch.equal(plain.net.weight, again.net.weight)  # the comparison is deterministic
    assert not torch.allclose(plain.net.weight, clipped.net.weight)


def test_early_stopping_per_model_and_lr_monitor_without_wandb(tmp_path):
    import json

    _, out = _fit(tmp_path, "stopped", constant_val=True, patience=1, epochs=6)
    assert json.loads((out / "done.json").read_text())["epochs"] == 2  # best at epoch 0, no gain at 1: stop
    metrics = pd.read_csv(out / "csv" / "metrics.csv")
    assert any(c.startswith("lr-") for c in metrics.columns), list(metrics.columns)  # CSV logger only, no W&B
    cfg = compose_fast(tmp_path, "model.co_attention.early_stopping_patience=3")
    assert cfg.model.co_attention.early_stopping_patience == 3
    assert cfg.model.hierarchical.early_stopping_patience is None


@pytest.mark.slow
def test_multirun_one_run_dir_per_job_and_a_comparison_table(tmp_path, capsys):
    from popstack.commands.train import main

    rc = main(["-m", "debug=fast", "stages=[prepare,features]", f"paths.root_dir={tmp_path}",
               "features.sentence_model=", "features.tfidf_dim=2,3"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    (sweep,) = (tmp_path / "outputs" / "demo").glob("multirun-*")
    table = pd.read_csv(sweep / "comparison.csv")
    assert table["features.tfidf_dim"].tolist() == [2, 3] and (table.status == "ok").all()
    assert "features/seconds_text" in table.columns
    for job in ("0", "1"):
        cfg = OmegaConf.load(sweep / job / "config.yaml")
        assert cfg.features.tfidf_dim == int(job) + 2 and (sweep / job / "features" / "features.parquet").is_file()
    assert (sweep / "comparison.md").read_text().startswith("| job |")


def test_cfg_job_prints_the_composed_config_and_writes_nothing(tmp_path, capsys):
    from popstack.commands.train import main

    assert main(["--cfg", "job", "debug=fast", f"paths.root_dir={tmp_path}", "trainer.accumulate_grad_batches=4"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.trainer.accumulate_grad_batches == 4 and printed.n_folds == 2
    assert list(tmp_path.iterdir()) == []


def test_wandb_environment_wins_and_artifacts_stay_in_the_run_dir(tmp_path, monkeypatch):
    from popstack.pipeline.tracking import Tracker, init_settings

    cfg = compose_fast(tmp_path, "logger=wandb_offline", "logger.wandb.project=from-config")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    assert init_settings(cfg, run_dir, environ={})["project"] == "from-config"
    env = {"WANDB_PROJECT": "team-proj", "WANDB_ENTITY": "team", "WANDB_MODE": "offline", "WANDB_TAGS": "a,b"}
    settings = init_settings(cfg, run_dir, environ=env)
    assert (settings["project"], settings["entity"], settings["mode"]) == ("team-proj", "team", "offline")
    assert settings["tags"] == ["a", "b"] and settings["group"] == f"{cfg.name}-{run_dir.name}"

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    (run_dir / "submission.json").write_text("{}")
    tracker = Tracker(cfg, run_dir)
    try:
        run = tracker.start("report")
        assert (run.group, run.job_type) == (settings["group"], "report")
        tracker.artifact("submission", "submission", [run_dir / "submission.json"], aliases=("latest", "best"))
        fold = tracker.open_job("co_attention", "co_attention/fold1", {"fold": 1})
        assert (fold.job_type, fold.config["fold"], fold.group) == ("co_attention", 1, settings["group"])
        tracker.close_job()
        tracker.log({"x": 1.0})  # reopens the stage's run
        assert tracker.run.job_type == "report"
    finally:
        tracker.finish()
    staged = list((run_dir / "wandb" / "data" / "artifacts").rglob("*"))
    assert any(p.is_file() for p in staged), "artifacts must be staged inside the run directory"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) >= 2


@pytest.mark.parametrize("case", ["parent_missing", "out_is_dir", "parent_is_file"])
def test_predict_checks_out_before_any_work(case, tmp_path, capsys):
    from popstack.commands.predict import main

    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir.json").mkdir()
    out = {"parent_missing": tmp_path / "nope" / "p.json", "out_is_dir": tmp_path / "dir.json",
           "parent_is_file": tmp_path / "afile" / "p.json"}[case]
    # the run directory does not exist either: the --out check must come first
    assert main([str(tmp_path / "no-run"), str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out"), err
    assert not (tmp_path / "nope").exists()


def test_under_a_sweep_agent_the_pipeline_is_the_agents_single_run(tmp_path, monkeypatch):
    from popstack.pipeline.tracking import Tracker, model_job_logger

    cfg = compose_fast(tmp_path, "logger=wandb_offline")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_RUN_ID", "sweep0001")  # what `wandb agent` sets for the command it launches
    tracker = Tracker(cfg, run_dir)
    try:
        first = tracker.start("prepare")
        assert first.id == "sweep0001" and tracker.start("stack") is first
        logger, callback = model_job_logger("co_attention/fold0")
        assert logger.experiment is first and logger._prefix == "co_attention/fold0"
        callback.teardown(None, None, "fit")
        assert tracker.run is first
    finally:
        tracker.finish()
