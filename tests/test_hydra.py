"""The Hydra entry point: @hydra.main behaviour (.hydra/, train.log, --cfg hydra, --info), one error line for a
mandatory value, GPU configs printed without a GPU, the callbacks group, the SLURM launcher and Optuna sweeper
configs."""

from __future__ import annotations

import importlib.util

import pytest
from omegaconf import OmegaConf

from tests.helpers import run_cli


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class Recorder:
    """A callback built from the config (``_target_``): records the fits it saw."""

    fits: list[str] = []

    def __init__(self, tag: str = "x"):
        from lightning.pytorch.callbacks import Callback

        self.tag = tag
        self.__class__ = type("RecorderCallback", (Recorder, Callback), {})

    def on_fit_start(self, trainer, pl_module) -> None:
        Recorder.fits.append(self.tag)


def test_missing_mandatory_value_is_one_error_line_exit_2(tmp_path, capsys):
    from popstack.commands.train import main

    assert main(["experiment=smpd", f"paths.root_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data.root must be set"), err
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_prints_a_gpu_config_without_a_gpu(tmp_path, capsys, monkeypatch):
    import torch

    from popstack.commands.train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--cfg", "job", "trainer=gpu", f"paths.root_dir={tmp_path}"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.trainer.accelerator == "gpu"
    # running it still refuses, in one line
    assert main(["trainer=gpu", "debug=fast", f"paths.root_dir={tmp_path}"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cfg_hydra_and_info_are_hydras(tmp_path):
    proc = run_cli("train.py", "--cfg", "hydra", f"paths.root_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    hydra = OmegaConf.create(proc.stdout).hydra
    assert hydra.job.name == "train" and "comparison" in hydra.callbacks
    info = run_cli("train.py", "--info")
    assert info.returncode == 0 and "Hydra" in info.stdout + info.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_run_saves_its_overrides_and_a_log_file(tmp_path):
    from popstack.commands.train import main

    run_dir = tmp_path / "run"
    assert main(["debug=fast", "stages=[prepare]", f"paths.root_dir={tmp_path}", f"hydra.run.dir={run_dir}"]) == 0
    overrides = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    assert "stages=[prepare]" in overrides and (run_dir / "posts.parquet").is_file()
    assert "[prepare] done" in (run_dir / "train.log").read_text()


def test_callbacks_group_entries_join_the_pipelines_own(tmp_path):
    from popstack.pipeline.config import compose_config
    from popstack.pipeline.schema import ConfigError
    from popstack.pipeline.training import fit_resumable, user_callbacks
    from tests.test_ecosystem import TinyData, TinyRegressor

    cfg = compose_config(["debug=fast", f"paths.root_dir={tmp_path}", "+callbacks.off=null",
                          "+callbacks.rec._target_=tests.test_hydra.Recorder", "+callbacks.rec.tag=from-config"])
    built = user_callbacks(cfg.callbacks)
    assert len(built) == 1
    Recorder.fits.clear()
    fit_resumable(TinyRegressor(), TinyData(), tmp_path / "fit", trainer_cfg=OmegaConf.to_container(cfg.trainer),
                  max_epochs=1, monitor="val/loss", mode="min", seed=0, progress_bar=False, extra_callbacks=built)
    assert Recorder.fits == ["from-config"]
    assert (tmp_path / "fit" / "checkpoints" / "best.ckpt").is_file()  # the pipeline's checkpointing still runs
    with pytest.raises(ConfigError, match="callbacks"):
        compose_config(["debug=fast", f"paths.root_dir={tmp_path}", "+callbacks.bad.patience=3"])


def test_slurm_launcher_and_optuna_sweeper_configs_compose(tmp_path):
    """The README's SLURM (submitit) launcher and Optuna sweep: composed with the plugins' ``_target_``s (the files
    spell out every field, so this runs without the plugins); with the plugins installed, Hydra builds them."""
    from hydra import compose, initialize_config_dir

    from popstack.pipeline.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra/sweeper=src_search", "trainer=ddp",
                                          f"paths.root_dir={tmp_path}"], return_hydra_config=True)
    launcher, sweeper = cfg.hydra.launcher, cfg.hydra.sweeper
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node and launcher.submitit_folder.endswith(".submitit/%j")
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and "model.co_attention.lr" in sweeper.params
    if _has("hydra_plugins.hydra_submitit_launcher") and _has("hydra_plugins.hydra_optuna_sweeper"):
        from hydra.utils import instantiate
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

        assert isinstance(instantiate(launcher), SlurmLauncher)
        assert isinstance(instantiate(sweeper), OptunaSweeper)


@pytest.mark.slow
@pytest.mark.skipif(not _has("hydra_plugins.hydra_optuna_sweeper"), reason="hydra-optuna-sweeper not installed")
def test_an_optuna_sweep_runs_and_maximises_the_blend_src(tmp_path):
    from popstack.commands.train import main

    assert main(["-m", "hydra/sweeper=src_search", "hydra.sweeper.n_trials=2", "debug=fast",
                 f"paths.root_dir={tmp_path}", "features.sentence_model="]) == 0
    (sweep,) = (tmp_path / "outputs" / "demo").glob("multirun-*")
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert 0 < best.best_value <= 1 and (sweep / "comparison.csv").is_file()

