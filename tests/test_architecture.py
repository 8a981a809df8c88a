"""The structure docs/architecture.md describes: room imports point one way, the stage registry is complete and
ordered, run files are named in one place, and predict.py does not load the report's plotting."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from popstack.pipeline.layout import RunLayout
from tests.helpers import ROOT

#: Folder of each room (relative to the repository), by the name after ``popstack.``.
ROOM_DIRS = {"datamodules": "datamodules", "features": "popstack/features", "lightning_modules": "lightning_modules",
             "stacking": "stacking", "pipeline": "popstack/pipeline", "commands": "popstack/commands"}
#: Every name ``RunLayout`` gives, relative to the run directory.
LAYOUT_NAMES = {e.rel for e in vars(RunLayout).values() if hasattr(e, "rel")}


def imported_modules(path) -> set[str]:
    """Full names of the modules a Python file imports (at any depth of the file; absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def documented_import_table() -> dict[str, set[str]]:
    """docs/architecture.md's table "Rooms and the direction of imports": room -> the rooms it may import."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Rooms and the direction of imports", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        room = cells[0].strip("`/").rsplit("/", 1)[-1]
        table[room] = set(re.findall(r"`(\w+)`", cells[-1]))
    return table


def room_imports(room: str) -> dict[str, set[str]]:
    """file -> the other parts of popstack it imports (the name after ``popstack.``; ``popstack`` for the top)."""
    out = {}
    for p in (ROOT / ROOM_DIRS[room]).rglob("*.py"):
        parts = [m.split(".") for m in imported_modules(p) if m.split(".")[0] == "popstack"]
        out[str(p.relative_to(ROOT))] = {x[1] if len(x) > 1 else "popstack" for x in parts} - {room}
    return out


def test_the_documented_table_names_every_room():
    assert set(documented_import_table()) == set(ROOM_DIRS)


@pytest.mark.parametrize("room", sorted(ROOM_DIRS))
def test_every_import_follows_the_documented_table(room):
    allowed = documented_import_table()[room]
    offenders = {f: sorted(used - allowed) for f, used in room_imports(room).items() if used - allowed}
    assert not offenders, f"{room} may import only {sorted(allowed)} (docs/architecture.md)"


def test_code_imports_rooms_only_by_their_full_name():
    """``from popstack.stacking import ...``, never ``from stacking import ...``: a bare room name would import a
    second copy of the module from a checkout and does not exist in the installed wheel."""
    bare = {"pipeline", "features", "commands", "configs", *ROOM_DIRS}
    offenders = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in (".venv", "build") or rel.parts[0].startswith("."):
            continue
        used = {m.split(".")[0] for m in imported_modules(p)} & bare
        if used:
            offenders[str(rel)] = sorted(used)
    assert not offenders


def test_registry_is_ordered_and_every_stage_module_has_the_one_interface():
    from popstack.pipeline.stages import STAGE_NAMES, STAGES

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
    for p in (ROOT / ROOM_DIRS["pipeline"]).rglob("*.py"):
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
    code = ("import sys, popstack.commands.predict, popstack.pipeline.inference, popstack.pipeline.stages.prepare, "
            "popstack.pipeline.stages.features, popstack.pipeline.neural, popstack.stacking.stack; "
            "bad = [m for m in ('popstack.pipeline.render', 'popstack.pipeline.stages.report') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
