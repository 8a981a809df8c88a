"""What every stage module shares: the context its ``run`` receives and the config sections several depend on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import Manifest


@dataclass
class StageContext:
    """What a stage's ``run`` gets: the config, the run's layout, the W&B tracker (None on ranks above 0 and in
    tests), the manifests of the stages finished so far, the content checksums of the upstream outputs the stage
    reads (``upstream``) and the fingerprints of the outside files it reads (``inputs``, its ``outside_inputs``)."""

    cfg: DictConfig
    layout: RunLayout
    tracker: Any = None
    manifests: dict[str, Manifest] = field(default_factory=dict)
    upstream: dict[str, Any] = field(default_factory=dict)
    inputs: Any = None


def common_config(c: dict) -> dict:
    """The config keys of every stage that splits or seeds."""
    return {"seed": c["seed"], "n_folds": c["n_folds"], "folds": c["folds"]}


def data_config(c: dict) -> dict:
    """``data`` without ``root`` and without the source sections (``data.<kind>``) of the sources not in use or
    empty: where the raw data lives is not part of a stage's identity, its content is (the prepare stage's
    ``outside_inputs``), so a moved data root with the same files changes nothing."""
    from popstack.datamodules.sources import sources

    data = c["data"]
    dropped = {k for k in sources() if k in data and (k != data["kind"] or not data[k])}
    return {k: v for k, v in data.items() if k != "root" and k not in dropped}


def no_outside_inputs(cfg: DictConfig) -> None:
    """``outside_inputs`` of a stage that reads nothing from outside the run directory."""
    return None
