"""docs/reproduction.md: every row of the papers' tables names config keys that exist in that experiment's composed
config, and a single literal in the "Ours" column is the value the experiment holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

DOC = Path(__file__).resolve().parent.parent / "docs" / "reproduction.md"
SECTIONS = {"cmpa_dgpl": "## CMPA-DGPL", "hyperfusion": "## HyperFusion"}
MISSING = object()


def table_rows(section: str) -> list[dict[str, str]]:
    """The first table under ``section`` as dicts keyed by its header cells."""
    text = DOC.read_text()
    lines = text[text.index(section):].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append([c.strip() for c in ln.strip().strip("|").split("|")])
    header, body = table[0], table[2:]
    assert all(len(r) == len(header) for r in body), f"{section}: a row has a stray '|'"
    return [dict(zip(header, r)) for r in body]


@pytest.mark.parametrize("experiment", sorted(SECTIONS))
def test_every_row_names_existing_config_keys_and_our_values_match(experiment):
    from popstack.pipeline.config import compose_config

    cfg = compose_config([f"experiment={experiment}"], validate=False)
    rows = table_rows(SECTIONS[experiment])
    assert len(rows) >= 25, f"{experiment}: only {len(rows)} rows"
    for row in rows:
        keys = re.findall(r"`([a-z_][\w.]*)`", row["Config key"])
        assert keys, f"{experiment}: row {row['Setting']!r} names no config key"
        for key in keys:
            assert OmegaConf.select(cfg, key, default=MISSING) is not MISSING, f"{experiment}: {key} does not exist"
        ours = re.fullmatch(r"`([^`]*)`", row["Ours"])
        if ours and len(keys) == 1:
            value = OmegaConf.select(cfg, keys[0])
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            assert value == yaml.safe_load(ours.group(1)) or str(value) == ours.group(1), \
                f"{experiment}: {keys[0]} is {value!r}, docs/reproduction.md says {ours.group(1)!r}"
