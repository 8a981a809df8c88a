"""The six stages of ``train.py`` in order, and what each reads; the driver is ``pipeline.driver``.

Each stage is one module here (``pipeline.stages.<name>``) exposing

    run(ctx: StageContext) -> StageResult   # its outputs (relative to the run directory), counts and metrics
    config(c: dict) -> dict                 # the config sections its outputs depend on
    outside_inputs(cfg) -> dict | None      # fingerprints of the files it reads from outside the run directory

``STAGES`` is the ordered registry. Each entry names the upstream outputs the stage reads (``RunLayout`` names;
None: all outputs of that stage): that is both its dependency list and what its manifest hash covers. A stage's
module is imported when the stage runs (stage modules import torch, Lightning and the rooms), so importing the
registry, e.g. to validate a config, stays cheap.

    prepare  -> posts.parquet, vocab.json, folds.parquet, shards/
    features -> features/                                   (reads prepare)
    neural   -> embeddings/, neural/<model>/fold<k>/          (reads prepare, features)
    extract  -> neural/features.parquet, predictions, ...    (reads prepare, features, neural)
    stack    -> stack/                                      (reads prepare, features, extract)
    report   -> report.md, *.png, submission.json, predictions.parquet  (reads prepare, stack)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from omegaconf import DictConfig

from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import StageResult
from popstack.pipeline.stages.base import StageContext

Reads = dict[str, "tuple[str, ...] | None"]


@dataclass(frozen=True)
class Stage:
    """One entry of the registry: the stage's name (its module is ``pipeline.stages.<name>``), the upstream outputs
    it reads, and whether only the first process runs it (the other ranks wait for its manifest when a later stage
    they run reads it)."""

    name: str
    reads: Reads
    rank_zero_only: bool

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.name}")

    def run(self, ctx: StageContext) -> StageResult:
        return self.module.run(ctx)

    def config(self, c: dict) -> dict:
        return self.module.config(c)

    def outside_inputs(self, cfg: DictConfig):
        return self.module.outside_inputs(cfg)

    def reads_for(self, cfg: DictConfig) -> Reads:
        """``reads``, plus what a config switches on (the features stage reads the shards for image statistics)."""
        reads = dict(self.reads)
        if self.name == "features" and cfg.features.image_stats:
            reads["prepare"] = (*reads["prepare"], RunLayout.shards)
        return reads

    @property
    def depends(self) -> tuple[str, ...]:
        return tuple(self.reads)


STAGES: tuple[Stage, ...] = (
    Stage("prepare", reads={}, rank_zero_only=True),
    Stage("features", reads={"prepare": (RunLayout.posts, RunLayout.folds)}, rank_zero_only=True),
    Stage("neural", reads={"prepare": None, "features": (RunLayout.tabular,)}, rank_zero_only=False),
    Stage("extract", reads={"prepare": None, "features": (RunLayout.tabular,), "neural": None}, rank_zero_only=False),
    Stage("stack", reads={"prepare": (RunLayout.posts, RunLayout.folds), "features": None, "extract": None},
          rank_zero_only=True),
    Stage("report", reads={"prepare": (RunLayout.posts,), "stack": None}, rank_zero_only=True),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

__all__ = ["STAGES", "STAGE_NAMES", "Stage", "StageContext"]
