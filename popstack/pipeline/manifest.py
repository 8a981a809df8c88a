"""Stage manifests: what a stage ran with and what it wrote, so a rerun skips finished stages, and only those.

A manifest is ``<run>/manifests/<stage>.json`` holding

- ``hash``: the hash of the stage's config section, of the raw files it read (``inputs``; the prepare stage's
  data root, see :func:`raw_fingerprint`) and of the checksums of the upstream outputs it reads;
- ``outputs``: paths relative to the run directory, and ``checksums``: one :func:`checksum` per output;
- counts, metrics and seconds.

A stage is skipped when its manifest exists, the hash matches and every output still matches its checksum; a
missing, truncated or altered output makes the stage rerun. Checksums are content hashes (sha256 of the bytes;
files above ``FULL_HASH_BYTES`` hash their size and ``SAMPLE_BLOCKS`` evenly spaced 1 MiB blocks), plus each
file's size and modification time: a file whose size and mtime are unchanged is trusted without reading it, so
verifying a finished stage costs one ``stat`` per file; a file with a new mtime (a copied run directory, an
edit) is re-hashed and accepted when its content is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from popstack.datamodules.atomic import TMP_MARK, atomic_write_json
from popstack.pipeline.layout import RunLayout

#: Files up to this size are hashed whole; larger ones (embedding caches at SMPD scale: tens of GB) are sampled.
FULL_HASH_BYTES = 256 << 20
SAMPLE_BLOCKS = 64
BLOCK = 1 << 20
#: Image files of a raw data root are fingerprinted by size and mtime (reading 486k photos per run is too slow).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


def config_hash(payload: Any) -> str:
    """Stable short hash of a JSON-serialisable payload (dict keys sorted)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path, size: int | None = None) -> str:
    """sha256 of a file's bytes (whole up to ``FULL_HASH_BYTES``, else size + ``SAMPLE_BLOCKS`` blocks), hex."""
    size = path.stat().st_size if size is None else size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(BLOCK), b""):
                h.update(chunk)
        else:
            h.update(f"sampled:{size}".encode())
            for i in range(SAMPLE_BLOCKS):
                f.seek((size - BLOCK) * i // (SAMPLE_BLOCKS - 1))
                h.update(f.read(BLOCK))
    return h.hexdigest()


def _files(path: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of ``path`` itself or of every file under it, sorted; temporary files excluded."""
    if path.is_file():
        return [("", path)]
    return sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                  if p.is_file() and TMP_MARK not in p.name)


def checksum(path: Path, previous: dict | None = None) -> dict | None:
    """``{name: [size, mtime_ns, digest]}`` for a file (name ``""``) or every file of a directory; None if absent.

    Files whose size and mtime equal those in ``previous`` keep their recorded digest without being read.
    """
    if not path.exists():
        return None
    known = previous or {}
    out = {}
    for name, p in _files(path):
        st = p.stat()
        old = known.get(name)
        if old is not None and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            out[name] = list(old)
        else:
            out[name] = [st.st_size, st.st_mtime_ns, file_digest(p, st.st_size)]
    return out


def content_of(check: dict | None) -> dict | None:
    """The part of a checksum that identifies content (sizes and digests; mtimes dropped)."""
    return None if check is None else {name: [size, digest] for name, (size, _, digest) in check.items()}


def raw_fingerprint(root: Path, exclude: tuple[Path, ...] = ()) -> dict:
    """What the prepare stage read from a raw data root: ``{relative path: [size, sha256]}`` for metadata files,
    ``{relative path: [size, mtime_ns]}`` for images (their list, sizes and modification times).

    Confined like the reader (``datamodules.confine``): nothing outside the root is opened, stat'ed or followed. A
    symlink is resolved one component at a time inside the root; one whose target leaves the root is recorded as
    ``[-1, "outside <target>"]`` (its target never touched), a symlinked folder inside the root as
    ``[-1, "link <real relative path>"]`` (its files are fingerprinted where they really are). Folders in
    ``exclude`` (the run directory, when it lies inside the root) and temporary files are left out.
    """
    from popstack.datamodules.confine import real_root, resolve_inside

    base = real_root(root)
    skip = {real_root(p) for p in exclude}
    out = {}

    def add(name: str, real: Path) -> None:
        st = real.stat()  # ``real`` has no symlink component: this stat stays inside the root
        if stat.S_ISDIR(st.st_mode):
            out[name] = [-1, f"link {real.relative_to(base).as_posix()}"]
        elif stat.S_ISREG(st.st_mode):
            second = st.st_mtime_ns if real.suffix.lower() in IMAGE_SUFFIXES else file_digest(real, st.st_size)
            out[name] = [st.st_size, second]

    todo = [base]
    while todo:  # os.walk would stat every symlink's target to tell folders from files: this walk never does
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                path = Path(entry.path)
                if TMP_MARK in entry.name or path in skip:
                    continue
                name = path.relative_to(base).as_posix()
                if entry.is_dir(follow_symlinks=False):
                    todo.append(path)
                elif not entry.is_symlink():
                    add(name, path)
                else:
                    real = resolve_inside(base, name)
                    if real is None:
                        out[name] = [-1, f"outside {os.readlink(path)}"]
                    elif real.exists() and real not in skip:
                        add(name, real)
    return dict(sorted(out.items()))


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
    checksums: dict[str, dict | None]
    counts: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float
    #: ``config_hash`` of the stage's config section alone, and the content checksums of the upstream outputs it
    #: read: what ``pipeline.run_check`` compares with ``config.yaml`` and the upstream manifests (None in
    #: manifests written before they were recorded).
    config: str | None = None
    upstream: dict | None = None
    skipped: bool = False

    FIELDS = ("stage", "hash", "outputs", "checksums", "counts", "metrics", "seconds")
    OPTIONAL = ("config", "upstream")

    @classmethod
    def read(cls, path: Path) -> "Manifest | None":
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.FIELDS}, **{k: data.get(k) for k in cls.OPTIONAL})
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, OSError):
            return None  # a damaged (or older) manifest means "not finished": the stage reruns

    def record(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS + self.OPTIONAL}


class StageRunner:
    """Runs stages in one run directory, skipping those whose manifest matches."""

    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print, write_manifests: bool = True):
        self.layout = RunLayout(Path(run_dir))
        self.run_dir = self.layout.root
        self.log = log
        self.write_manifests = write_manifests  # False in DDP child processes: only the first process records
        self.manifests: dict[str, Manifest] = {}
        #: Remove an output altered behind the stage's back before the stage reruns, so the stage's own caches
        #: (the embedding cache's key, a fold's done.json) cannot keep it (single-process runs: no rank races).
        self.remove_damaged = False
        self.damaged: list[str] = []

    def manifest_path(self, stage: str) -> Path:
        return self.layout.manifest(stage)

    def upstream(self, reads: dict[str, tuple[str, ...] | None]) -> dict[str, dict | None]:
        """Content checksums of the upstream outputs a stage reads: ``reads`` maps an upstream stage to the
        outputs read from it (None: all of them); stages without a manifest contribute nothing."""
        out = {}
        for name, paths in reads.items():
            manifest = self.manifests.get(name)
            if manifest is None:
                continue
            for rel in manifest.outputs if paths is None else paths:
                out[rel] = content_of(manifest.checksums.get(rel))
        return out

    def stage_hash(self, stage: str, config: Any, inputs: Any, reads: dict[str, tuple[str, ...] | None]) -> str:
        return config_hash({"stage": stage, "config": config, "inputs": inputs, "upstream": self.upstream(reads)})

    def verify(self, manifest: Manifest) -> str | None:
        """None when every output matches its checksum (refreshing recorded mtimes), else what is wrong (the first
        problem; every altered output is listed in ``self.damaged``)."""
        fresh, problems = {}, []
        self.damaged = []
        for rel in manifest.outputs:
            recorded = manifest.checksums.get(rel)
            current = checksum(self.run_dir / rel, recorded)
            if current is None:
                problems.append(f"{rel} is missing")
            elif content_of(current) != content_of(recorded):
                self.damaged.append(rel)
                problems.append(f"{rel} changed since the stage wrote it")
            fresh[rel] = current
        if problems:
            return problems[0]
        if fresh != manifest.checksums:
            manifest.checksums = fresh
            if self.write_manifests:
                atomic_write_json(self.manifest_path(manifest.stage), manifest.record())
        return None

    def run(
        self, stage: str, config: Any, fn: Callable[[], StageResult], inputs: Any = None,
        reads: dict[str, tuple[str, ...] | None] | None = None,
        before_rerun: Callable[[str], None] | None = None,
    ) -> Manifest:
        """Skip ``stage`` when its manifest matches, else run ``fn``. ``before_rerun(why)`` is called (and may raise)
        before ``fn`` when the stage would run with a changed config or inputs, or for the first time."""
        digest = self.stage_hash(stage, config, inputs, reads or {})
        previous = Manifest.read(self.manifest_path(stage))
        if before_rerun is not None and (previous is None or previous.hash != digest):
            before_rerun("it has not run yet" if previous is None else "its config or inputs changed")
        if previous is not None and previous.hash == digest:
            problem = self.verify(previous)
            if problem is None and (previous.config is None or previous.upstream is None):
                # written before these were recorded: the hash matched, so they are what it covers
                previous.config, previous.upstream = config_hash(config), self.upstream(reads or {})
                if self.write_manifests:
                    atomic_write_json(self.manifest_path(stage), previous.record())
            if problem is None:
                self.log(f"[{stage}] skipped: finished earlier with the same config and inputs "
                         f"({self.manifest_path(stage)})")
                previous.skipped = True
                self.manifests[stage] = previous
                return previous
            self.log(f"[{stage}] running: {problem}")
            if self.remove_damaged:
                for rel in self.damaged:
                    self._remove(rel)
        elif previous is not None:
            self.log(f"[{stage}] running: its config or inputs changed")
        else:
            self.log(f"[{stage}] running")
        start = time.perf_counter()
        result = fn()
        checksums = {rel: checksum(self.run_dir / rel) for rel in result.outputs}
        manifest = Manifest(
            stage=stage, hash=digest, outputs=result.outputs, checksums=checksums, counts=result.counts,
            metrics=result.metrics, seconds=round(time.perf_counter() - start, 3), config=config_hash(config),
            upstream=self.upstream(reads or {}),
        )
        if self.write_manifests:
            atomic_write_json(self.manifest_path(stage), manifest.record())
        self.manifests[stage] = manifest
        self.log(f"[{stage}] done in {manifest.seconds:.1f} s")
        return manifest

    def _remove(self, rel: str) -> None:
        """Delete the altered output ``rel`` (a file or a folder of the run directory) before its stage rewrites it."""
        import shutil

        path = self.run_dir / rel
        self.log(f"removing {rel}: altered since its stage wrote it, rebuilt now")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def load_existing(self, stage: str) -> Manifest | None:
        """The manifest of a stage not run in this invocation (for `stages=[...]` subsets)."""
        manifest = Manifest.read(self.manifest_path(stage))
        if manifest is not None:
            self.manifests[stage] = manifest
        return manifest
