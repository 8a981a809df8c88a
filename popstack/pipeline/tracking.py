"""Weights & Biases for the whole pipeline: the runs of one pipeline run form one W&B group.

Every stage that runs in a launch logs into a W&B run of its own (``job_type`` = the stage) and every neural model
fold into one more (``job_type`` = the model, ``fold`` in its config), all in ``group`` = the pipeline run
(``<name>-<run dir name>``; a sweep job's run directory ``<sweep dir>/<k>`` gives ``<name>-<sweep dir name>-<k>``),
so the runs of a pipeline are found together in the group view. A stage skipped because it finished earlier opens
no run, and every launch gets fresh run ids: a rerun never writes a second run under an id that already holds
results. Only a model fold whose fit resumes from its last checkpoint reuses its earlier id, and only online
(``wandb_run_ids.json`` records the ids of the last launch); offline it gets a new id with ``resumed_from`` in its
config. Tags are the launch's command-line overrides (``.hydra/overrides.yaml``, paths left out) plus the config's.

Artifacts are logged by the run that made them, under names that carry the group (``<group>-<what>``), so every
pipeline run has its own collections and its ``best``/``latest`` aliases never move to another run's files:

- each model fold's run: ``<group>-<model>-fold<k>`` (the checkpoint used, aliases ``best``, ``fold-k``), with
  ``define_metric`` on the monitored value (summary = the best value, the checkpoint used) and ``best/<monitor>``;
- the stack stage's run: ``<group>-predictor`` (type ``model``): everything ``Predictor`` needs
  (``pipeline.inference.predictor_files``), so ``Predictor.from_artifact("<entity>/<project>/<group>-predictor:v0")``
  predicts anywhere; it uses the fold checkpoints' artifacts;
- the report stage's run: ``<group>-submission`` and ``<group>-report``; it uses the predictor artifact.

``use_artifact`` (the lineage graph) needs a W&B server: offline, each run records the artifacts it used in its
config (``used_artifacts``) instead. Files are staged inside ``<run_dir>/wandb/data`` so that
``wandb sync <run_dir>/wandb/offline-run-*`` finds them with the run directory.

The standard environment variables win over the config: ``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_ENTITY``,
``WANDB_RUN_GROUP``, ``WANDB_TAGS`` (comma-separated, added to the config's); under a sweep agent
(``WANDB_RUN_ID``/``WANDB_SWEEP_ID`` set) the pipeline is the agent's single run. ``logger=wandb`` without an API key
(``WANDB_API_KEY`` or ``~/.netrc``) logs offline and says so in one warning line. Nothing whose name looks secret
(``key``, ``token``, ``secret``, ``password``) reaches the W&B config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from popstack.datamodules.atomic import atomic_write_json
from popstack.pipeline.layout import RunLayout

log = logging.getLogger("popstack")

SECRET_MARKERS = ("key", "token", "secret", "password")
#: wandb's artifact staging area follows this variable; the tracker points it inside the run directory.
STAGING_ENV = "WANDB_DATA_DIR"
#: Hydra's record of a launch's command-line overrides, inside the run directory.
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
#: Overrides that name paths or Hydra internals: not tags (they differ on every machine and run).
UNTAGGED_KEYS = ("hydra.", "paths.", "run_dir", "data.root", "data.table.path",
                 "backbone.pretrained")
#: W&B's longest tag.
MAX_TAG = 64


def _public_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as a dict with anything secret-looking removed (W&B config is visible to collaborators)."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items() if not any(m in str(k).lower() for m in SECRET_MARKERS)}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(OmegaConf.to_container(cfg, resolve=True))


def group_name(cfg: DictConfig, run_dir: Path) -> str:
    """``<name>-<run dir name>``; a sweep job's numbered run directory adds the sweep directory's name, so the jobs
    of two sweeps never share a group."""
    run_dir = Path(run_dir)
    if run_dir.name.isdigit():
        return f"{cfg.name}-{run_dir.parent.name}-{run_dir.name}"
    return f"{cfg.name}-{run_dir.name}"


def override_tags(run_dir: Path) -> list[str]:
    """The launch's command-line overrides (``<run_dir>/.hydra/overrides.yaml``) as tags, without path-valued,
    Hydra and secret-looking keys, each cut to W&B's tag length."""
    path = Path(run_dir) / OVERRIDES_FILE
    if not path.is_file():
        return []
    overrides = OmegaConf.to_container(OmegaConf.load(path)) or []
    keys = [str(o).lstrip("+~") for o in overrides]
    secret = [o for o in keys if any(m in o.split("=", 1)[0].lower() for m in SECRET_MARKERS)]
    return [o[:MAX_TAG] for o in keys if not o.startswith(UNTAGGED_KEYS) and o not in secret]


def init_settings(cfg: DictConfig, run_dir: Path, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``wandb.init`` arguments shared by every run of the pipeline: the environment wins over the config."""
    env = os.environ if environ is None else environ
    w = cfg.logger.wandb
    mode = env.get("WANDB_MODE") or w.mode
    if mode == "online" and not env.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        mode = "offline"  # no account configured: keep working, sync later
        log.warning("W&B: no API key (WANDB_API_KEY or ~/.netrc), logging OFFLINE into %s/wandb; upload later with "
                    "`wandb sync %s/wandb/offline-run-*`", run_dir, run_dir)
    tags = [*w.tags, *override_tags(run_dir), *(t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip())]
    return {
        "project": env.get("WANDB_PROJECT") or w.project,
        "entity": env.get("WANDB_ENTITY") or w.entity,
        "group": env.get("WANDB_RUN_GROUP") or w.group or group_name(cfg, run_dir),
        "mode": mode, "tags": list(dict.fromkeys(tags)), "dir": str(run_dir),
    }


def artifact_safe(name: str) -> str:
    """``name`` with every character W&B refuses in an artifact name replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def build_artifact(name: str, kind: str, paths: list[Path], run_dir: Path, metadata: dict | None = None):
    """A ``wandb.Artifact`` of files/folders of ``run_dir``, each entry named by its path relative to the run
    directory (so a downloaded artifact has the run directory's layout)."""
    import wandb

    art = wandb.Artifact(name=name, type=kind, metadata=metadata or {})
    for p in map(Path, paths):
        rel = p.relative_to(run_dir).as_posix()
        if p.is_dir():
            art.add_dir(str(p), name=rel)
        elif p.is_file():
            art.add_file(str(p), name=rel)
    return art


class Tracker:
    """Thin wrapper: no-ops when W&B is disabled, so stage code never branches on it.

    ``start(job_type)`` finishes the current stage's W&B run and opens the next one; ``open_job``/``close_job`` open
    and finish a model fold's run while the stage's run stays open; ``stage_done(stage)`` logs what a stage made.
    ``Tracker.active`` is the tracker of the running pipeline (the neural stage opens one run per model fold).
    """

    active: "Tracker | None" = None

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.enabled = bool(cfg.logger.wandb.enabled) and os.environ.get("WANDB_MODE") != "disabled"
        self.run = None  # the open stage run
        self.job = None  # the open model-fold run
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.logged: dict[str, Any] = {}  # artifacts logged in this launch, by their short name
        self.opened = 0
        if not self.enabled:
            return
        self.settings = init_settings(cfg, self.run_dir)
        self.config = _public_config(cfg)
        self.ids_file = RunLayout(self.run_dir).wandb_run_ids
        try:
            self.previous = json.loads(self.ids_file.read_text()) if self.ids_file.is_file() else {}
        except ValueError:
            self.previous = {}
        self.ids: dict[str, str] = {}
        # Under a W&B sweep agent (which sets WANDB_RUN_ID) the whole pipeline is the agent's one run, so the
        # sweep sees its metric; stages and folds then log under prefixes instead of in runs of their own.
        self.single_run = bool(os.environ.get("WANDB_RUN_ID") or os.environ.get("WANDB_SWEEP_ID"))
        Tracker.active = self

    @property
    def offline(self) -> bool:
        return self.enabled and self.settings["mode"] == "offline"

    def artifact_name(self, what: str) -> str:
        """The artifact collection of ``what`` for this pipeline run: ``<group>-<what>``."""
        return artifact_safe(f"{self.settings['group']}-{what}")

    def _init(self, job_type: str, name: str, extra_config: dict[str, Any] | None, resume: bool = False):
        import wandb

        earlier = self.previous.get(name) if resume else None
        reuse = earlier if earlier and not self.offline else None  # offline, a reused id would overwrite on sync
        run_id = reuse or uuid.uuid4().hex[:8]
        config = {**self.config, **(extra_config or {})}
        if earlier and not reuse:
            config["resumed_from"] = earlier
        self.ids[name] = run_id
        atomic_write_json(self.ids_file, {**self.previous, **self.ids})
        run = wandb.init(**self.settings, id=run_id, resume="allow" if reuse else None, job_type=job_type,
                         name=f"{self.settings['group']}/{name}", config=config, reinit="create_new")
        self.opened += 1
        if run.url:
            log.info("W&B %s: %s", run.name, run.url)
        return run

    def start(self, job_type: str, name: str | None = None, extra_config: dict[str, Any] | None = None):
        """Open the W&B run of one stage in the pipeline's group (finishing the previous stage's); returns it."""
        if not self.enabled:
            return None
        if self.single_run:
            return self._single()
        self.finish_run()
        self.run = self._init(job_type, name or job_type, extra_config)
        return self.run

    def _single(self):
        import wandb

        if self.run is None:
            self.run = wandb.init(**self.settings, id=os.environ.get("WANDB_RUN_ID"), job_type="pipeline",
                                  config=self.config, reinit="create_new")
        return self.run

    def open_job(self, job_type: str, name: str, extra_config: dict[str, Any], resume: bool = False):
        """Open the run of a job nested in the current stage (a model fold); the stage's run stays open.
        ``resume``: the job continues an interrupted one (its earlier id is reused online)."""
        if not self.enabled:
            return None
        if self.single_run:
            return self._single()
        self.close_job()
        self.job = self._init(job_type, name, extra_config, resume=resume)
        return self.job

    def close_job(self) -> None:
        if self.job is not None:
            self.job.finish()
            self.job = None

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def table(self, key: str, df: pd.DataFrame) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(dataframe=df.reset_index(drop=True))})

    def image(self, key: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def artifact(self, what: str, kind: str, paths: list[Path], aliases: tuple[str, ...] = ("latest",),
                 run=None, uses: tuple[str, ...] = ()):
        """Log files/folders as the artifact ``<group>-<what>`` from ``run`` (default: the stage's), entries named
        by their path relative to the run directory, staged inside ``<run_dir>/wandb/data`` so an offline run
        directory carries its artifacts; ``uses``: short names of artifacts of this launch the run consumed."""
        run = self.run if run is None else run
        if run is None:
            return None
        self.use(run, uses)
        before = os.environ.get(STAGING_ENV)
        os.environ[STAGING_ENV] = str(RunLayout(self.run_dir).wandb / "data")
        try:
            art = build_artifact(self.artifact_name(what), kind, paths, self.run_dir,
                                 metadata={"run_dir": self.run_dir.name, "group": self.settings["group"]})
            run.log_artifact(art, aliases=list(dict.fromkeys(aliases)))
        finally:
            if before is None:
                os.environ.pop(STAGING_ENV, None)
            else:
                os.environ[STAGING_ENV] = before
        self.logged[what] = art
        return art

    def use(self, run, names: tuple[str, ...]) -> None:
        """``run`` consumed the artifacts ``names`` (short names, logged earlier in this launch): ``use_artifact``
        online (the lineage graph); offline, where W&B refuses it, their names in ``used_artifacts`` of the config."""
        arts = [self.logged[n] for n in names if n in self.logged]
        if not arts:
            return
        if self.offline:
            run.config.update({"used_artifacts": [a.name for a in arts]}, allow_val_change=True)
            return
        for art in arts:
            art.wait()
            run.use_artifact(art)

    def fold_done(self, run, model: str, fold: int, best: Path | None, score, monitor: str) -> None:
        """A model fold's run closes: the checkpoint used as ``<group>-<model>-fold<k>`` and its score in the
        summary (``best/<monitor>``)."""
        if best is None or not Path(best).is_file():
            return
        run.summary.update({f"best/{monitor}": None if score is None else float(score),
                            "best/checkpoint": Path(best).resolve().relative_to(self.run_dir.resolve()).as_posix()})
        self.artifact(f"{model}-fold{fold}", "model", [Path(best).resolve()], run=run,
                      aliases=("best", f"fold-{fold}", "latest"))

    def stage_done(self, stage: str) -> None:
        """Log what ``stage`` (just run, not skipped) made, from its own run: the stack stage the predictor, the
        report stage the submission and the report."""
        if self.run is None or self.single_run and stage not in ("stack", "report"):
            return
        run = RunLayout(self.run_dir)
        if stage == "stack":
            from popstack.pipeline.inference import predictor_files

            folds = tuple(n for n in self.logged if "-fold" in n)
            self.artifact("predictor", "model", predictor_files(self.run_dir, self.cfg), uses=folds)
        elif stage == "report":
            self.artifact("submission", "submission", [run.submission, run.predictions], uses=("predictor",))
            self.artifact("report", "report", [run.report, *sorted(run.root.glob("*.png"))])

    def finish_run(self) -> None:
        self.close_job()
        if self.run is not None:
            self.run.finish()
            self.run = None

    def finish(self) -> None:
        self.finish_run()
        if self.enabled and self.opened and self.offline:
            log.info("W&B: %d offline run(s) in %s; upload with `wandb sync %s/offline-run-*`", self.opened,
                     RunLayout(self.run_dir).wandb, RunLayout(self.run_dir).wandb)
        if Tracker.active is self:
            Tracker.active = None


def model_job_logger(prefix: str, monitor: str | None = None, mode: str = "min", resume: bool = False):
    """``(WandbLogger, callback)`` for one model fold (``prefix`` = ``"<model>/fold<k>"``): a W&B run with
    ``job_type`` = the model and ``fold`` in its config, ``define_metric(monitor, summary=mode)`` so its summary
    holds the best value (the checkpoint used), closed -- after logging the checkpoint used as an artifact -- when
    the fit ends; None without an active tracker. ``resume``: the fit continues from its last checkpoint."""
    tracker = Tracker.active
    if tracker is None or not tracker.enabled:
        return None
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import WandbLogger

    model, _, fold = prefix.partition("/fold")
    run = tracker.open_job(model, prefix, {"model_name": model, "fold": int(fold or 0)}, resume=resume)
    if monitor is not None and not tracker.single_run:
        run.define_metric(monitor, summary=mode)

    class CloseJob(Callback):
        def teardown(self, trainer, pl_module, stage: str) -> None:
            if tracker.single_run:
                return
            ckpt = trainer.checkpoint_callback if trainer is not None else None
            if stage == "fit" and ckpt is not None and ckpt.best_model_path and monitor is not None:
                tracker.fold_done(run, model, int(fold or 0), Path(ckpt.best_model_path), ckpt.best_model_score,
                                  monitor)
            tracker.close_job()

    return WandbLogger(experiment=run, prefix=prefix if tracker.single_run else ""), CloseJob()
