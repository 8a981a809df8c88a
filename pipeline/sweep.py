"""Hydra-style multirun for ``train.py -m``: expand sweep overrides, one run directory per job, a comparison table.

    python train.py -m model.co_attention.lr=1e-3,3e-4 seed=1,2     # 4 jobs, cartesian product

Sweep syntax is Hydra's override grammar (``a,b``, ``range(1,4)``, ``choice(...)``, ``glob(...)``). Every job is
composed and validated before the first one runs, so a bad value in any job fails the sweep with nothing written.
Jobs run one after another in this process, into ``<sweep dir>/<job number>`` (``hydra.sweep.dir``); the sweep
directory gets ``comparison.csv`` and ``comparison.md`` (one row per job: its overrides, status and metrics).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Callable

import pandas as pd
from omegaconf import DictConfig

from datamodules.atomic import atomic_path, atomic_write_text

log = logging.getLogger("popstack")
COMPARISON = "comparison"


def expand(overrides: list[str]) -> tuple[list[list[str]], dict[str, int]]:
    """The per-job override lists (cartesian product of the sweeps, in command-line order) and the swept keys
    with their position in each job's list."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes, swept = [], {}
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            swept[key.lstrip("+~")] = len(axes)
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([override.input_line])
    return [list(job) for job in itertools.product(*axes)], swept


def metric_row(metrics: dict) -> dict[str, float]:
    """``{stage: {name: value}}`` (what ``train`` returns) flattened to ``{"stage/name": value}``."""
    return {f"{stage}/{name}": value for stage, values in metrics.items() for name, value in (values or {}).items()}


def run_sweep(overrides: list[str], compose: Callable[[list[str]], DictConfig],
              train: Callable[[DictConfig], dict]) -> tuple[Path, pd.DataFrame]:
    """Compose every job (``compose(overrides)``), run them in order, write the comparison table.

    Returns the sweep directory and the table (one row per job: ``job``, the swept keys, ``run_dir``, ``status``,
    then the metrics). A job that fails with a user error is recorded as failed and the sweep goes on.
    """
    from pipeline.config import sweep_dir as find_sweep_dir
    from pipeline.errors import user_error_types

    jobs, swept = expand(overrides)
    root = find_sweep_dir(jobs[0])
    cfgs = [compose([*job, f"run_dir={root / str(i)}"]) for i, job in enumerate(jobs)]
    log.info("multirun: %d jobs into %s", len(jobs), root)
    rows = []
    for i, (job, cfg) in enumerate(zip(jobs, cfgs)):
        values = {key: job[pos].split("=", 1)[1] for key, pos in swept.items()}
        log.info("multirun: job %d/%d %s", i + 1, len(jobs), " ".join(f"{k}={v}" for k, v in values.items()))
        row = {"job": i, **values, "run_dir": str(Path(cfg.run_dir).relative_to(root))}
        try:
            row.update(status="ok", **metric_row(train(cfg)))
        except user_error_types() as err:
            row.update(status=f"failed: {' '.join(str(err).split())}")
            log.error("multirun: job %d failed: %s", i, err)
        rows.append(row)
        write_comparison(root, pd.DataFrame(rows))  # rewritten after every job: a partial sweep is readable
    return root, pd.DataFrame(rows)


def write_comparison(root: Path, table: pd.DataFrame) -> None:
    """``comparison.csv`` and ``comparison.md`` in the sweep directory (atomically)."""
    from pipeline.render import markdown_table

    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / f"{COMPARISON}.csv") as tmp:
        table.to_csv(tmp, index=False)
    atomic_write_text(root / f"{COMPARISON}.md", markdown_table(table) + "\n")
