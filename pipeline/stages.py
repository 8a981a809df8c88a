"""The six stages of ``train.py``, each a method that reads and writes inside the run directory.

Stage order and what each reads:

    prepare  -> posts.parquet, vocab.json, folds.parquet, shards/
    features -> features/                       (reads prepare)
    neural   -> embeddings/, neural/<model>/fold<k>/  (reads prepare, features)
    extract  -> neural/features.parquet, neural/predictions.parquet  (reads prepare, features, neural)
    stack    -> stack/                          (reads prepare, features, extract)
    report   -> report.md, *.png, submission.json, predictions.parquet  (reads prepare, stack)

A stage reruns when its config section, the outside files it reads (``_stage_inputs``) or the checksums of the
upstream outputs it reads (``READS``) changed, or when one of its own outputs no longer matches its checksum
(``pipeline.manifest``). Only the first process holds the run directory's lock (``pipeline.lock``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.config import RUN_DIR_ENV, save_config
from pipeline.distributed import topology
from pipeline.errors import UserError
from pipeline.lock import RunLock
from pipeline.manifest import StageResult, StageRunner

log = logging.getLogger("popstack")

STAGES: tuple[str, ...] = ("prepare", "features", "neural", "extract", "stack", "report")
#: The upstream outputs each stage reads (None: all outputs of that stage). A stage's manifest hash covers their
#: content checksums, so it reruns exactly when something it reads changed.
READS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "prepare": {},
    "features": {"prepare": ("posts.parquet", "folds.parquet")},
    "neural": {"prepare": None, "features": ("features/tabular.parquet",)},
    "extract": {"prepare": None, "features": ("features/tabular.parquet",), "neural": None},
    "stack": {"prepare": ("posts.parquet", "folds.parquet"), "features": None, "extract": None},
    "report": {"prepare": ("posts.parquet",), "stack": None},
}
DEPENDS: dict[str, tuple[str, ...]] = {stage: tuple(reads) for stage, reads in READS.items()}
#: Stages that only the first process runs (``pipeline.distributed.topology().is_zero``); the other ranks wait for
#: their manifests when a later stage they run (neural, extract) reads them, and skip them otherwise.
RANK_ZERO_ONLY: frozenset[str] = frozenset({"prepare", "features", "stack", "report"})


class Pipeline:
    """Runs ``cfg.stages`` in order into ``cfg.run_dir``; see the module docstring for the data flow.

    Under many processes every process runs this (torchrun and SLURM start them together, Lightning's launcher
    starts the others at the first ``Trainer``). ``pipeline.distributed.topology`` tells rank 0, which alone checks
    the run directory, writes the config and the manifests, and runs ``RANK_ZERO_ONLY``; the others wait for those
    manifests (matching this run's hashes) before neural and extract, which every rank runs.
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        devices = cfg.trainer.devices
        self.topology = topology(devices_per_node=devices if isinstance(devices, int) and devices > 0 else None)
        self.runner = StageRunner(self.run_dir, log.info, write_manifests=self.topology.is_zero)
        self.tracker = None
        #: Each stage's fingerprints of the outside files it reads (``_stage_inputs``), computed once per run.
        self.inputs: dict[str, dict | None] = {}

    # ------------------------------------------------------------------ driver
    def run(self) -> dict:
        cfg = self.cfg
        unknown = [s for s in cfg.stages if s not in STAGES]
        if unknown:
            raise UserError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
        self._check_backbone()  # before any other work: no network -> one clear line
        self._prepare_run_dir()
        child = not self.topology.is_zero
        lock = None if child else RunLock(self.run_dir).acquire()  # before the first write into the run
        try:
            return self._run_stages(child)
        finally:
            if lock is not None:
                lock.release()

    def _run_stages(self, child: bool) -> dict:
        cfg = self.cfg
        if not child:
            save_config(cfg, self.run_dir)
        if self._is_distributed():
            os.environ.setdefault(RUN_DIR_ENV, str(self.run_dir))
        from pipeline.tracking import Tracker

        import lightning as L

        from pipeline.training import quiet_lightning

        quiet_lightning()
        L.seed_everything(cfg.seed, verbose=False)
        self.tracker = Tracker(cfg, self.run_dir) if not child else None
        metrics: dict = {}
        try:
            for i, stage in enumerate(STAGES):
                if stage not in cfg.stages:
                    self.runner.load_existing(stage)
                    continue
                if child and stage in RANK_ZERO_ONLY:
                    if any(s in cfg.stages and s not in RANK_ZERO_ONLY for s in STAGES[i + 1:]):
                        self._await_rank_zero(stage)
                    continue
                self._require_upstream(stage)
                if self.tracker is not None:
                    self.tracker.start(stage)  # W&B: one run per stage (job_type), in the pipeline's group
                self.inputs[stage] = self._stage_inputs(stage)
                manifest = self.runner.run(
                    stage, self._stage_config(stage), getattr(self, f"stage_{stage}"),
                    inputs=self.inputs[stage], reads=self._reads(stage),
                )
                metrics[stage] = manifest.metrics
                if not child and self.topology.world_size > 1:
                    self._publish(stage, manifest.hash)
                if self.tracker is not None:
                    self.tracker.log({f"time/{stage}_s": manifest.seconds})
        finally:
            if self.tracker is not None:
                self.tracker.finish()
            if not child:  # every rank is past its waits once rank 0 gets here (neural needs them all)
                self._launch_record().unlink(missing_ok=True)
        return metrics

    def _reads(self, stage: str) -> dict[str, tuple[str, ...] | None]:
        """``READS[stage]``, plus the shards for the features stage when the image-statistics family reads them."""
        reads = dict(READS[stage])
        if stage == "features" and self.cfg.features.get("image_stats", False):
            reads["prepare"] = (*reads["prepare"], "shards")
        return reads

    def _launch_record(self) -> Path:
        """``manifests/.launch-<id>.json``: the stage hashes rank 0 recorded in this launch (``topology().launch_id``),
        so the other ranks know when a stage of *this* launch is done without fingerprinting the raw data themselves."""
        safe = "".join(c if c.isalnum() else "-" for c in self.topology.launch_id)
        return self.run_dir / "manifests" / f".launch-{safe}.json"

    def _publish(self, stage: str, digest: str) -> None:
        from datamodules.atomic import atomic_write_json

        path = self._launch_record()
        done = json.loads(path.read_text()) if path.is_file() else {}
        atomic_write_json(path, {**done, stage: digest})

    def _await_rank_zero(self, stage: str) -> None:
        """On ranks above 0: wait until rank 0 has recorded ``stage`` in this launch, then load its manifest.

        Processes started by Lightning's own launcher begin at rank 0's first Trainer, after rank 0 finished the
        single-process stages (and before it knew the launch): they read the manifests as they are."""
        from pipeline.distributed import wait_for, wait_timeout
        from pipeline.manifest import Manifest

        if self.topology.launcher == "lightning":
            manifest = Manifest.read(self.runner.manifest_path(stage))
            if manifest is None:
                raise UserError(f"stage {stage!r} has no manifest in {self.run_dir}: rank 0 did not finish it")
            self.runner.manifests[stage] = manifest
            return
        record = self._launch_record()

        def recorded() -> Manifest | None:
            try:
                digest = json.loads(record.read_text()).get(stage)
            except (OSError, ValueError):
                return None
            manifest = Manifest.read(self.runner.manifest_path(stage)) if digest else None
            return manifest if manifest is not None and manifest.hash == digest else None

        self.runner.manifests[stage] = wait_for(recorded, f"{self.runner.manifest_path(stage)} (stage {stage!r} "
                                                f"run by rank 0 in this launch)", wait_timeout(self.cfg))

    def _is_distributed(self) -> bool:
        t = self.cfg.trainer
        return int(t.devices) * int(t.num_nodes) > 1 or "ddp" in str(t.strategy)

    def _check_backbone(self) -> None:
        from lightning_modules.backbone import check_pretrained

        check_pretrained(self.cfg.backbone.name, self.cfg.backbone.pretrained)

    def _prepare_run_dir(self) -> None:
        if not self.topology.is_zero:  # rank 0 checks the directory (and later writes the config)
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to run directory {self.run_dir}: {err.strerror or err}") from err

    def _require_upstream(self, stage: str) -> None:
        for dep in DEPENDS[stage]:
            if dep not in self.runner.manifests:
                raise UserError(
                    f"stage {stage!r} needs the outputs of {dep!r}, which has not run in {self.run_dir}; "
                    f"add it to stages=[...]"
                )

    def _stage_config(self, stage: str) -> dict:
        """The config sections a stage's outputs depend on (its manifest hash covers these, its raw inputs and
        the upstream outputs it reads)."""
        from pipeline.training import result_trainer_args

        c = OmegaConf.to_container(self.cfg, resolve=True)
        common = {"seed": c["seed"], "n_folds": c["n_folds"], "folds": c["folds"]}
        # Where the raw data lives is not part of it: its content is (``_stage_inputs``), so a moved data root
        # with the same files changes nothing.
        data = {k: v for k, v in c["data"].items() if k != "root"}
        sections = {
            "prepare": {"data": data, **common},
            "features": {"features": c["features"], **common},
            "neural": {"backbone": c["backbone"], "model": c["model"], "data": data,
                       "trainer": result_trainer_args(c["trainer"]), **common},
            "extract": {"model": c["model"]},
            "stack": {"stacking": c["stacking"], **common},
            "report": {"name": c["name"]},
        }
        return sections[stage]

    def _stage_inputs(self, stage: str) -> dict | None:
        """Fingerprints of the files a stage reads from outside the run directory: the data root (prepare), the
        user's CLIP weights file (neural), the GloVe file (features)."""
        from pipeline.manifest import file_digest, raw_fingerprint

        if stage == "prepare":
            from pipeline.prepare import raw_root

            return raw_fingerprint(raw_root(self.cfg))
        if stage == "neural":
            from pipeline.neural import backbone_key

            return backbone_key(self.cfg)
        glove = self.cfg.features.get("glove_path") if stage == "features" else None
        return {"glove": file_digest(Path(glove))} if glove and Path(glove).is_file() else None

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    # ------------------------------------------------------------------ stages
    def stage_prepare(self) -> StageResult:
        from pipeline.prepare import prepare

        return prepare(self.cfg, self.run_dir)

    def stage_features(self) -> StageResult:
        from pipeline.featurize import featurize

        return featurize(self.cfg, self.run_dir)

    def stage_neural(self) -> StageResult:
        from pipeline.neural import train_neural

        return train_neural(self.cfg, self.run_dir, inputs=self.runner.upstream(READS["neural"]),
                            backbone=self.inputs["neural"])

    def stage_extract(self) -> StageResult:
        from pipeline.neural import extract_neural

        return extract_neural(self.cfg, self.run_dir)

    def stage_stack(self) -> StageResult:
        from pipeline.stack import stack

        return stack(self.cfg, self.run_dir, self.tracker)

    def stage_report(self) -> StageResult:
        from pipeline.reporting import report

        return report(self.cfg, self.run_dir, self.tracker, self.runner.manifests)
