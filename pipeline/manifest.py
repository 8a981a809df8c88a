"""Stage manifests: what a stage ran with and what it wrote, so a rerun skips finished stages.

A manifest is ``<run>/manifests/<stage>.json`` holding the stage's config hash (the hash of its own config
section plus the hashes of the stages it reads from), its outputs (paths relative to the run directory),
counts and seconds. A stage is skipped when its manifest exists, the hash matches and every output exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def config_hash(payload: Any) -> str:
    """Stable short hash of a JSON-serialisable payload (dict keys sorted)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@dataclass
class StageResult:
    """What a stage function returns: output paths (relative to the run dir), counts and metrics."""

    outputs: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    stage: str
    hash: str
    outputs: list[str]
    counts: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float
    skipped: bool = False

    @classmethod
    def read(cls, path: Path) -> "Manifest | None":
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in ("stage", "hash", "outputs", "counts", "metrics", "seconds")})
        except (json.JSONDecodeError, KeyError, TypeError):
            return None  # a damaged manifest means "not finished": the stage reruns


class StageRunner:
    """Runs stages in one run directory, skipping those whose manifest matches."""

    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print, write_manifests: bool = True):
        self.run_dir = Path(run_dir)
        self.log = log
        self.write_manifests = write_manifests  # False in DDP child processes: only the first process records
        self.manifests: dict[str, Manifest] = {}

    def manifest_path(self, stage: str) -> Path:
        return self.run_dir / "manifests" / f"{stage}.json"

    def stage_hash(self, stage: str, config: Any, depends_on: tuple[str, ...]) -> str:
        upstream = {name: self.manifests[name].hash for name in depends_on if name in self.manifests}
        return config_hash({"stage": stage, "config": config, "upstream": upstream})

    def done(self, stage: str, digest: str) -> Manifest | None:
        manifest = Manifest.read(self.manifest_path(stage))
        if manifest is None or manifest.hash != digest:
            return None
        if not all((self.run_dir / out).exists() for out in manifest.outputs):
            return None
        return manifest

    def run(
        self, stage: str, config: Any, fn: Callable[[], StageResult], depends_on: tuple[str, ...] = ()
    ) -> Manifest:
        digest = self.stage_hash(stage, config, depends_on)
        finished = self.done(stage, digest)
        if finished is not None:
            self.log(f"[{stage}] skipped: finished earlier with the same config ({self.manifest_path(stage)})")
            finished.skipped = True
            self.manifests[stage] = finished
            return finished
        self.log(f"[{stage}] running")
        start = time.perf_counter()
        result = fn()
        manifest = Manifest(
            stage=stage, hash=digest, outputs=result.outputs, counts=result.counts, metrics=result.metrics,
            seconds=round(time.perf_counter() - start, 3),
        )
        if self.write_manifests:
            write_json_atomic(self.manifest_path(stage), manifest.__dict__ | {"skipped": False})
        self.manifests[stage] = manifest
        self.log(f"[{stage}] done in {manifest.seconds:.1f} s")
        return manifest

    def load_existing(self, stage: str) -> Manifest | None:
        """The manifest of a stage not run in this invocation (for `stages=[...]` subsets)."""
        manifest = Manifest.read(self.manifest_path(stage))
        if manifest is not None:
            self.manifests[stage] = manifest
        return manifest
