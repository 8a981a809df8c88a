"""Weights & Biases for the whole pipeline: the runs of one pipeline run form one W&B group.

Every stage logs into its own W&B run (``job_type`` = the stage) and every neural model fold into one more
(``job_type`` = the model, ``fold`` in its config), all in ``group`` = the pipeline run (``<name>-<run dir name>``),
so the runs of a pipeline are found together in the group view. Run ids are stable per run directory
(``wandb_run_ids.json``), so a resumed pipeline appends to the same W&B runs.

The standard environment variables win over the config: ``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_ENTITY``,
``WANDB_RUN_GROUP``, ``WANDB_TAGS`` (comma-separated, added to the config's); under a sweep agent
(``WANDB_RUN_ID``/``WANDB_SWEEP_ID`` set) the pipeline is the agent's single run. Files go up as artifacts with
``wandb.log_artifact`` (works offline; ``WandbLogger(offline=True)`` refuses ``log_model``), staged inside
``<run_dir>/wandb/data`` so that ``wandb sync <run_dir>/wandb/offline-run-*`` finds them with the run directory.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from datamodules.atomic import atomic_write_json
from pipeline.layout import RunLayout

SECRET_MARKERS = ("key", "token", "secret", "password")
#: wandb's artifact staging area follows this variable; the tracker points it inside the run directory.
STAGING_ENV = "WANDB_DATA_DIR"


def _public_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as a dict with anything secret-looking removed (W&B config is visible to collaborators)."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items() if not any(m in str(k).lower() for m in SECRET_MARKERS)}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(OmegaConf.to_container(cfg, resolve=True))


def init_settings(cfg: DictConfig, run_dir: Path, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``wandb.init`` arguments shared by every run of the pipeline: the environment wins over the config."""
    env = os.environ if environ is None else environ
    w = cfg.logger.wandb
    mode = env.get("WANDB_MODE") or w.mode
    if mode == "online" and not env.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        mode = "offline"  # no account configured: keep working, sync later
    tags = list(w.tags) + [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {
        "project": env.get("WANDB_PROJECT") or w.project,
        "entity": env.get("WANDB_ENTITY") or w.entity,
        "group": env.get("WANDB_RUN_GROUP") or w.get("group") or f"{cfg.name}-{run_dir.name}",
        "mode": mode, "tags": list(dict.fromkeys(tags)), "dir": str(run_dir),
    }


class Tracker:
    """Thin wrapper: no-ops when W&B is disabled, so stage code never branches on it.

    ``start(job_type, name, extra_config)`` finishes the current W&B run and opens (or resumes) the one of that job;
    ``Tracker.active`` is the tracker of the running pipeline (the neural stage opens one run per model fold).
    """

    active: "Tracker | None" = None

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.enabled = bool(cfg.logger.wandb.enabled) and os.environ.get("WANDB_MODE") != "disabled"
        self.run = None
        self.current: tuple[str, str] | None = None  # (job_type, name) of the open run
        self._outer: tuple[str, str] | None = None  # the job whose run a nested job interrupted
        self.pending: tuple[str, str] | None = None  # that job, once the nested one closed (reopened lazily)
        self.run_dir = run_dir
        if not self.enabled:
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        self.settings = init_settings(cfg, run_dir)
        self.config = _public_config(cfg)
        self.ids_file = RunLayout(run_dir).wandb_run_ids
        self.ids = json.loads(self.ids_file.read_text()) if self.ids_file.is_file() else {}
        # Under a W&B sweep agent (which sets WANDB_RUN_ID) the whole pipeline is the agent's one run, so the
        # sweep sees its metric; stages and folds then log under prefixes instead of in runs of their own.
        self.single_run = bool(os.environ.get("WANDB_RUN_ID") or os.environ.get("WANDB_SWEEP_ID"))
        Tracker.active = self

    def start(self, job_type: str, name: str | None = None, extra_config: dict[str, Any] | None = None):
        """Open the W&B run of one job (a stage, or a model fold) in the pipeline's group; returns it."""
        if not self.enabled:
            return None
        import wandb

        if self.single_run:
            if self.run is None:
                self.run = wandb.init(**self.settings, id=os.environ.get("WANDB_RUN_ID"), job_type="pipeline",
                                      config=self.config, reinit="finish_previous")
            return self.run
        self.finish_run()
        self.pending = None
        name = name or job_type
        if name not in self.ids:
            self.ids[name] = uuid.uuid4().hex[:8]
            atomic_write_json(self.ids_file, self.ids)
        self.run = wandb.init(
            **self.settings, id=self.ids[name], resume="allow", job_type=job_type,
            name=f"{self.settings['group']}/{name}", config={**self.config, **(extra_config or {})},
            reinit="finish_previous",
        )
        self.current = (job_type, name)
        return self.run

    def open_job(self, job_type: str, name: str, extra_config: dict[str, Any]):
        """Open the run of a job nested in the current one (a model fold in the neural stage); ``close_job`` goes
        back."""
        self._outer = self.current or self.pending
        return self.start(job_type, name, extra_config)

    def close_job(self) -> None:
        """Finish a nested job's run; the outer job's run is reopened only if something is logged to it again."""
        if self.single_run:
            return
        self.finish_run()
        self.pending, self._outer = self._outer, None

    def _active_run(self):
        if self.run is None and self.pending is not None:
            self.start(*self.pending)
        return self.run

    def log(self, metrics: dict[str, Any]) -> None:
        if self._active_run() is not None:
            self.run.log(metrics)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self._active_run() is not None:
            self.run.summary.update(metrics)

    def table(self, key: str, df: pd.DataFrame) -> None:
        if self._active_run() is not None:
            import wandb

            self.run.log({key: wandb.Table(dataframe=df.reset_index(drop=True))})

    def image(self, key: str, path: Path) -> None:
        if self._active_run() is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def artifact(self, name: str, kind: str, paths: list[Path], aliases: tuple[str, ...] = ("latest",)) -> None:
        """Log files/folders as one artifact (entries named by their path relative to the run directory), staged
        inside ``<run_dir>/wandb/data`` so an offline run directory carries its artifacts."""
        if self._active_run() is None:
            return
        import wandb

        before = os.environ.get(STAGING_ENV)
        os.environ[STAGING_ENV] = str(RunLayout(self.run_dir).wandb / "data")
        try:
            art = wandb.Artifact(name=name, type=kind)
            for p in paths:
                rel = str(p.relative_to(self.run_dir))
                if p.is_dir():
                    art.add_dir(str(p), name=rel)
                elif p.is_file():
                    art.add_file(str(p), name=rel)
            self.run.log_artifact(art, aliases=list(dict.fromkeys(aliases)))
        finally:
            if before is None:
                os.environ.pop(STAGING_ENV, None)
            else:
                os.environ[STAGING_ENV] = before

    def log_run_artifacts(self) -> None:
        """The run's products: each model fold's best checkpoint (aliases ``best``, ``fold-k``, ``latest``), the
        stacker with the config, the submission and the report."""
        run = RunLayout(self.run_dir)
        for best in sorted(run.neural.glob("*/fold*/checkpoints/best.ckpt")):
            model, fold = best.parent.parent.parent.name, best.parent.parent.name.removeprefix("fold")
            self.artifact(f"{model}-fold{fold}", "model", [best], aliases=("best", f"fold-{fold}", "latest"))
        self.artifact("stacker", "model", [run.stack_model, run.config])
        self.artifact("submission", "submission", [run.submission, run.predictions])
        self.artifact("report", "report", [run.report, *sorted(run.root.glob("*.png"))])

    def finish_run(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
            self.current = None

    def finish(self) -> None:
        self.finish_run()
        self.pending = None
        if Tracker.active is self:
            Tracker.active = None


def model_job_logger(prefix: str):
    """``(WandbLogger, callback)`` for one model fold (``prefix`` = ``"<model>/fold<k>"``): a W&B run with
    ``job_type`` = the model and ``fold`` in its config, closed when the fit ends; None without an active tracker."""
    tracker = Tracker.active
    if tracker is None or not tracker.enabled:
        return None
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import WandbLogger

    model, _, fold = prefix.partition("/fold")
    run = tracker.open_job(model, prefix, {"model_name": model, "fold": int(fold or 0)})

    class CloseJob(Callback):
        def teardown(self, trainer, pl_module, stage: str) -> None:
            tracker.close_job()

    return WandbLogger(experiment=run, prefix=prefix if tracker.single_run else ""), CloseJob()
