"""Is a run directory consistent? What ``Predictor`` checks before any feature or neural work.

    check_run(run_dir, cfg)      # None, or UserError naming what is missing or out of date

A finished run is consistent when, for every stage whose outputs inference reads (prepare .. stack):

- its manifest is present and complete (``config`` and ``upstream`` recorded);
- its config section, computed from ``config.yaml``, hashes to the manifest's ``config``: the config inference uses
  is the one the stage ran with;
- the upstream checksums it recorded equal the checksums in the upstream stages' manifests (the hash chain): no
  stage was rerun after the stages that read it (a rerun killed half way, a partial ``stages=[...]`` rerun);
- the files inference reads match the checksums recorded for them (sizes and mtimes first, content when those
  differ: a copied run is re-hashed, nothing is ever written here).

Outputs inference never reads (shards, the embedding cache's arrays, the report) are left to the chain.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from omegaconf import DictConfig, OmegaConf

from popstack.pipeline.errors import UserError
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import Manifest, config_hash, content_of, file_digest

#: The stages whose outputs ``Predictor`` reads, in order.
INFERENCE_STAGES = ("prepare", "features", "neural", "extract", "stack")
#: Inside the outputs inference reads, files it never opens (bulky data checked by the chain alone).
_NOT_READ = (RunLayout.shards, RunLayout.posts, RunLayout.folds, RunLayout.feature_table, RunLayout.tabular,
             RunLayout.neural_features, RunLayout.neural_predictions)
#: The only file of ``embeddings/`` inference reads (it rebuilds its own cache): the run's copy of the backbone.
_CACHE_READ = (PurePosixPath(RunLayout.backbone).relative_to(RunLayout.embeddings).as_posix(),)


def _read_by_inference(rel: str, name: str) -> bool:
    """Whether inference opens file ``name`` of output ``rel`` (``""``: the output is that file)."""
    if rel in _NOT_READ:
        return False
    if rel == RunLayout.embeddings:
        return name in _CACHE_READ
    return not name.startswith("csv/")  # a fold's CSV log is Lightning's diary, not a model file


def check_run(run_dir: Path, cfg: DictConfig) -> None:
    """Raise one ``UserError`` naming the first inconsistency of the finished run ``run_dir`` (config ``cfg`` from
    its ``config.yaml``); see the module docstring."""
    from popstack.pipeline.stages import STAGES

    layout = RunLayout(run_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    manifests: dict[str, Manifest] = {}
    for stage in STAGES:
        if stage.name not in INFERENCE_STAGES:
            continue
        path = layout.manifest(stage.name)
        manifest = Manifest.read(path)
        where = f"{run_dir}: stage {stage.name!r}"
        if manifest is None:
            raise UserError(f"{where} has no readable manifest ({layout.rel(path)}); the run is not finished: "
                            f"rerun train.py on it")
        if manifest.config is None or manifest.upstream is None:
            raise UserError(f"{where}: its manifest predates consistency records; rerun train.py on it")
        if manifest.config != config_hash(stage.config(container)):
            raise UserError(f"{where} ran with another config than {RunLayout.config} (a rerun with other settings "
                            f"stopped before it); rerun train.py on the run")
        for up in stage.reads_for(cfg):
            recorded = manifests[up]
            for rel, content in manifest.upstream.items():
                if rel in recorded.outputs and content_of(recorded.checksums.get(rel)) != content:
                    raise UserError(f"{where} is out of date: it was computed from another {rel} than stage "
                                    f"{up!r} now holds (a rerun stopped half way?); rerun train.py on the run")
        _verify_files(run_dir, manifest, where)
        manifests[stage.name] = manifest


def inference_files(run_dir: Path) -> list[Path]:
    """The manifests of the inference stages and every file ``check_run`` verifies among their outputs: with
    ``config.yaml``, what a copy of the run needs to pass ``check_run`` (the W&B ``predictor`` artifact)."""
    layout = RunLayout(run_dir)
    files = []
    for stage in INFERENCE_STAGES:
        path = layout.manifest(stage)
        manifest = Manifest.read(path)
        if manifest is None:
            raise UserError(f"{run_dir}: stage {stage!r} has no readable manifest ({layout.rel(path)})")
        files.append(path)
        for rel in manifest.outputs:
            files += [run_dir / rel / name if name else run_dir / rel
                      for name in (manifest.checksums.get(rel) or {}) if _read_by_inference(rel, name)]
    return files


def _verify_files(run_dir: Path, manifest: Manifest, where: str) -> None:
    """Every file inference reads among ``manifest``'s outputs exists and matches its recorded checksum (a file
    whose size and mtime are as recorded is trusted without reading it, as ``pipeline.manifest`` does)."""
    for rel in manifest.outputs:
        for name, (size, mtime, digest) in (manifest.checksums.get(rel) or {}).items():
            if not _read_by_inference(rel, name):
                continue
            path = run_dir / rel / name if name else run_dir / rel
            label = f"{rel}/{name}" if name else rel
            try:
                st = path.stat()
                same = st.st_size == size and (st.st_mtime_ns == mtime or file_digest(path, st.st_size) == digest)
            except OSError:
                raise UserError(f"{where}: {label} is missing or unreadable; rerun train.py on the run") from None
            if not same:
                raise UserError(f"{where}: {label} changed since the stage wrote it; rerun train.py on the run")
