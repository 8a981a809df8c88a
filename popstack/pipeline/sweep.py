"""Hydra-style multirun for ``train.py -m``: expand sweep overrides, one run directory per job, a comparison table.

    python train.py -m features.tfidf_dim=10,20 seed=1,2     # 4 jobs, cartesian product

Sweeps run under Hydra (``@hydra.main`` in ``train.py``): its sweep syntax (``a,b``, ``range(1,4)``,
``choice(...)``, ``glob(...)``), its launchers (the basic one runs jobs one after another in this process; the
submitit launcher sends them to SLURM) and sweepers (Optuna: the task returns the blend's out-of-fold SRC). A basic
sweep's jobs are all composed and validated before the first one runs, so a bad value in any job fails the sweep
with nothing written. Jobs run into ``<sweep dir>/<job number>`` (``hydra.sweep.dir``); each records its line
(``record_job``) and, when the multirun ends, ``ComparisonCallback`` writes ``comparison.csv`` and ``comparison.md``
into the sweep directory (one row per job: the swept keys, status and metrics).
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from popstack.datamodules.atomic import atomic_path, atomic_write_json, atomic_write_text

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


def record_job(run_dir: str | Path, overrides: list[str], status: str, metrics: dict) -> None:
    """A sweep job's line of the comparison (``sweep_job.json`` in its run directory): its overrides, ``ok`` or
    ``failed: <why>``, its metrics (``{stage: {name: value}}``). Written where the job ran (any launcher)."""
    from popstack.pipeline.layout import RunLayout

    path = RunLayout(Path(run_dir)).sweep_job
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"overrides": overrides, "status": status, "metrics": metric_row(metrics)})


def comparison_table(root: Path) -> pd.DataFrame:
    """One row per job folder of the sweep directory ``root`` (``job``, the keys whose values differ between
    jobs, ``run_dir``, ``status``, then the metrics); a job that left no record (it crashed) is ``failed``."""
    from omegaconf import OmegaConf

    from popstack.pipeline.layout import RunLayout

    jobs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    records = []
    for job in jobs:
        path = RunLayout(job).sweep_job
        if path.is_file():
            records.append(json.loads(path.read_text()))
            continue
        saved = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(saved)) if saved.is_file() else []
        records.append({"overrides": overrides, "status": "failed: no result recorded (see its train.log)",
                        "metrics": {}})
    values = [dict(o.lstrip("+~").split("=", 1) for o in r["overrides"] if "=" in o) for r in records]
    swept = [k for k in dict.fromkeys(k for v in values for k in v) if len({v.get(k) for v in values}) > 1]
    rows = [{"job": int(job.name), **{k: v.get(k) for k in swept}, "run_dir": job.name, "status": r["status"],
             **r["metrics"]} for job, v, r in zip(jobs, values, records)]
    return pd.DataFrame(rows)


class ComparisonCallback(Callback):
    """Hydra callback (``hydra.callbacks.comparison`` in ``configs/train.yaml``): when a multirun ends, whatever
    its launcher or sweeper, ``comparison.csv``/``comparison.md`` in the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir).resolve()
        if not root.is_dir():
            return
        table = comparison_table(root)
        write_comparison(root, table)
        failed = int((~table.status.eq("ok")).sum()) if len(table) else 0
        print(f"multirun: {len(table)} jobs in {root} (comparison.csv, comparison.md)"
              + (f"; {failed} failed" if failed else ""))


def write_comparison(root: Path, table: pd.DataFrame) -> None:
    """``comparison.csv`` and ``comparison.md`` in the sweep directory (atomically)."""
    from popstack.pipeline.render import markdown_table

    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / f"{COMPARISON}.csv") as tmp:
        table.to_csv(tmp, index=False)
    atomic_write_text(root / f"{COMPARISON}.md", markdown_table(table) + "\n")
