"""The structure docs/architecture.md describes: room imports point one way, the stage registry is complete and
ordered, run files are named in one place, and predict.py does not load the report's plotting."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

from pipeline.layout import RunLayout
from tests.helpers import ROOT

ROOMS = ("datamodules", "features", "lightning_modules", "stacking")
#: Every name ``RunLayout`` gives, relative to the run directory.
LAYOUT_NAMES = {e.rel for e in vars(RunLayout).values() if hasattr(e, "rel")}


def imported_modules(path) -> set[str]:
    """Top-level package names a Python file imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("room", ROOMS)
def test_rooms_never_import_pipeline_or_the_entry_points(room):
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & {"pipeline", "train", "predict"})
                 for p in (ROOT / room).rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_stacking_and_datamodules_stay_out_of_the_neural_room():
    for room, banned in (("stacking", {"lightning_modules"}),
                         ("datamodules", {"features", "lightning_modules", "stacking"})):
        for p in (ROOT / room).rglob("*.py"):
            assert not imported_modules(p) & banned, p


def test_registry_is_ordered_and_every_stage_module_has_the_one_interface():
    from pipeline.stages import STAGE_NAMES, STAGES

    assert STAGE_NAMES == ("prepare", "features", "neural", "extract", "stack", "report")
    for i, stage in enumerate(STAGES):
        assert set(stage.depends) <= set(STAGE_NAMES[:i]), f"{stage.name} reads a later stage"
        for fn in ("run", "config", "outside_inputs"):
            assert callable(getattr(stage.module, fn)), f"pipeline.stages.{stage.name}.{fn}"
        for names in stage.reads.values():
            assert set(names or ()) <= LAYOUT_NAMES, stage.name


def test_run_file_names_are_spelled_only_in_the_layout():
    """No pipeline module other than layout.py writes a run file's name as a string literal."""
    names = {rel.rsplit("/", 1)[-1] for rel in LAYOUT_NAMES}
    # folder names that are also plain words, and key.json, which pipeline/training.py names for a fit's folder
    names -= {"features", "neural", "stack", "shards", "embeddings", "manifests", "wandb", "state", "model",
              "key.json"}
    pattern = re.compile("|".join(re.escape(f'"{n}"') for n in sorted(names)))
    hits = []
    for p in (ROOT / "pipeline").rglob("*.py"):
        if p.name == "layout.py":
            continue
        for lineno, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                hits.append(f"{p.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_predict_imports_no_plotting():
    """predict.py and the inference path never load the report stage or its rendering module (matplotlib may still
    arrive through a third-party import; popstack's own code does not ask for it there)."""
    code = ("import sys, predict, pipeline.inference, pipeline.stages.prepare, pipeline.stages.features, "
            "pipeline.neural, stacking.stack; "
            "bad = [m for m in ('pipeline.render', 'pipeline.stages.report') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
