"""The driver of ``train.py``: runs the registered stages (``pipeline.stages.STAGES``) in order in one run directory.

A stage reruns when its config section, the outside files it reads (its ``outside_inputs``) or the checksums of the
upstream outputs it reads (its registry entry's ``reads``) changed, or when one of its own outputs no longer matches
its checksum (``pipeline.manifest``). Only the first process holds the run directory's lock (``pipeline.lock``).
"""

from __future__ import annotations

import json
import logging
import os

from omegaconf import DictConfig, OmegaConf

from popstack.pipeline.checks import check_data_root, check_plan, refuse_stale_downstream
from popstack.pipeline.config import RUN_DIR_ENV, save_config
from popstack.pipeline.distributed import rank_device, topology, wait_for, wait_timeout
from popstack.pipeline.errors import UserError
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.lock import RunLock
from popstack.pipeline.manifest import Manifest, StageRunner
from popstack.pipeline.stages import STAGE_NAMES, STAGES, Stage, StageContext

log = logging.getLogger("popstack")


class Pipeline:
    """Runs ``cfg.stages`` in order into ``cfg.run_dir``; see the module docstring for the data flow.

    Under many processes every process runs this (torchrun and SLURM start them together, Lightning's launcher
    starts the others at the first ``Trainer``). ``pipeline.distributed.topology`` tells rank 0, which alone checks
    the run directory, writes the config and the manifests, and runs the stages registered ``rank_zero_only``; the
    others wait for those manifests (matching this run's hashes) before neural and extract, which every rank runs.
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.layout = RunLayout(cfg.run_dir)
        self.run_dir = self.layout.root
        devices = cfg.trainer.devices
        self.topology = topology(devices_per_node=devices if isinstance(devices, int) and devices > 0 else None)
        self.runner = StageRunner(self.run_dir, log.info, write_manifests=self.topology.is_zero)
        self.runner.remove_damaged = self.topology.world_size == 1 and not self._is_distributed()
        self.tracker = None

    # ------------------------------------------------------------------ driver
    def run(self) -> dict:
        cfg = self.cfg
        unknown = [s for s in cfg.stages if s not in STAGE_NAMES]
        if unknown:
            raise UserError(f"unknown stage(s) {unknown}; stages are {list(STAGE_NAMES)}")
        self._check_backbone()  # before any other work: no network -> one clear line
        rank_device(cfg.trainer.accelerator, cfg.trainer.devices)  # this rank's GPU is current before any CUDA work
        if self.topology.is_zero:  # validate first, write after (popstack/pipeline/checks.py)
            check_plan(cfg, self.layout)
            if "prepare" in cfg.stages:
                check_data_root(cfg)
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
        if self._is_distributed():
            os.environ.setdefault(RUN_DIR_ENV, str(self.run_dir))
        import lightning as L

        from popstack.pipeline.tracking import Tracker
        from popstack.pipeline.training import quiet_lightning

        quiet_lightning()
        L.seed_everything(cfg.seed, verbose=False)
        self.tracker = Tracker(cfg, self.run_dir) if not child else None
        metrics: dict = {}
        try:
            for i, stage in enumerate(STAGES):
                if stage.name not in cfg.stages:
                    self.runner.load_existing(stage.name)
                    continue
                if child and stage.rank_zero_only:
                    if any(s.name in cfg.stages and not s.rank_zero_only for s in STAGES[i + 1:]):
                        self._await_rank_zero(stage.name)
                    continue
                metrics[stage.name] = self._run_stage(stage, child)
                if not child:  # config.yaml changes only once a stage that uses it has completed
                    save_config(cfg, self.run_dir)
        finally:
            if self.tracker is not None:
                self.tracker.finish()
            if not child:  # every rank is past its waits once rank 0 gets here (neural needs them all)
                self._launch_record().unlink(missing_ok=True)
        return metrics

    def _run_stage(self, stage: Stage, child: bool) -> dict:
        """Run (or skip, when its manifest matches) one stage; returns its metrics."""
        self._require_upstream(stage)
        tracker = self.tracker
        inputs = stage.outside_inputs(self.cfg)  # computed once: a user's weights file is hashed once per run
        reads = stage.reads_for(self.cfg)
        ctx = StageContext(self.cfg, self.layout, self.tracker, self.runner.manifests, self.runner.upstream(reads),
                           inputs)
        config = stage.config(OmegaConf.to_container(self.cfg, resolve=True))

        def work():
            if tracker is not None:  # W&B: one run per stage that runs (none for a skipped one), in the group
                tracker.start(stage.name)
            return stage.run(ctx)

        manifest = self.runner.run(stage.name, config, work, inputs=inputs, reads=reads,
                                   before_rerun=None if child else
                                   lambda why: refuse_stale_downstream(self.cfg, self.layout, stage.name, why))
        if not child and self.topology.world_size > 1:
            self._publish(stage.name, manifest.hash)
        if tracker is not None and not manifest.skipped:
            tracker.log({f"time/{stage.name}_s": manifest.seconds})
            tracker.stage_done(stage.name)  # the stage's artifacts, from its own run
        return manifest.metrics

    def _launch_record(self):
        """The stage hashes rank 0 recorded in this launch (``topology().launch_id``), so the other ranks know when
        a stage of *this* launch is done without fingerprinting the raw data themselves."""
        return self.layout.launch_record(self.topology.launch_id)

    def _publish(self, stage: str, digest: str) -> None:
        from popstack.datamodules.atomic import atomic_write_json

        path = self._launch_record()
        done = json.loads(path.read_text()) if path.is_file() else {}
        atomic_write_json(path, {**done, stage: digest})

    def _await_rank_zero(self, stage: str) -> None:
        """On ranks above 0: wait until rank 0 has recorded ``stage`` in this launch, then load its manifest.

        Processes started by Lightning's own launcher begin at rank 0's first Trainer, after rank 0 finished the
        single-process stages (and before it knew the launch): they read the manifests as they are."""
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
        from popstack.lightning_modules.backbone import check_pretrained

        check_pretrained(self.cfg.backbone.name, self.cfg.backbone.pretrained)

    def _prepare_run_dir(self) -> None:
        if not self.topology.is_zero:  # rank 0 checks the directory (and later writes the config)
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"  # removed at once: not a file of the run
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to run directory {self.run_dir}: {err.strerror or err}") from err

    def _require_upstream(self, stage: Stage) -> None:
        for dep in stage.depends:
            if dep not in self.runner.manifests:
                raise UserError(
                    f"stage {stage.name!r} needs the outputs of {dep!r}, which has not run in {self.run_dir}; "
                    f"add it to stages=[...]"
                )
