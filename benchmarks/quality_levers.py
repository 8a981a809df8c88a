"""Stack-level levers judged on held-out data: rerun the stack of a finished run with one change at a time and
score the test split against the labels the data directory keeps aside (``signal.parquet``).

    python benchmarks/quality.py --worlds 1 --sizes 2000 --workdir W ...     # keeps W/<case>/run
    python benchmarks/quality_levers.py W/world1-2000/run [W/world2-2000/run ...] [--levers default,no_tabnet]

Levers (each against ``default``, the run's own stacking config):
no_neural_members (neural predictions leave the blend), no_tabnet, no_pseudo (0 pseudo-label rounds),
no_iqr (IQR filter off), blend_mae / blend_ridge (instead of the configured blend), no_image_stats (the
image-statistics family dropped), no_native_cats (category/user codes as plain numbers, not categoricals).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import print_table, write_results

LEVERS = ("default", "no_neural_members", "no_tabnet", "no_pseudo", "no_iqr", "blend_mae", "blend_ridge",
          "no_image_stats", "no_native_cats")


def variant(lever: str, scfg, features: pd.DataFrame, categorical: list[str], families: dict[str, str]):
    """(stack config, features, categorical columns) with ``lever`` applied."""
    from features.families import IMAGE_STATS

    if lever == "no_neural_members":
        scfg = dataclasses.replace(scfg, neural_columns=[])
    elif lever == "no_tabnet":
        scfg = dataclasses.replace(scfg, members={k: v for k, v in scfg.members.items() if k != "tabnet"})
    elif lever == "no_pseudo":
        scfg = dataclasses.replace(scfg, pseudo_rounds=0)
    elif lever == "no_iqr":
        scfg = dataclasses.replace(scfg, iqr_k=0.0)
    elif lever in ("blend_mae", "blend_ridge"):
        scfg = dataclasses.replace(scfg, blend=lever.removeprefix("blend_"))
    elif lever == "no_image_stats":
        features = features.drop(columns=[c for c in features.columns if families.get(c) == IMAGE_STATS])
    elif lever == "no_native_cats":
        categorical = []
    elif lever != "default":
        raise SystemExit(f"unknown lever {lever!r}; levers: {', '.join(LEVERS)}")
    return scfg, features, categorical


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--levers", default=",".join(LEVERS))
    p.add_argument("--name", default="quality_levers")
    a = p.parse_args()
    from datamodules.folds import read_folds
    from datamodules.schema import KEY, LABEL, NO_FOLD
    from features.families import NEURAL_PRED
    from pipeline.config import load_run_config
    from pipeline.layout import RunLayout
    from pipeline.stages.stack import stack_config, stack_inputs
    from stacking.metrics import scores
    from stacking.stack import run_stack

    rows = []
    for run in a.runs:
        cfg = load_run_config(run)
        X, families, categorical = stack_inputs(RunLayout(run))
        y = pd.read_parquet(run / "posts.parquet", columns=[LABEL])[LABEL].to_numpy()
        folds = read_folds(run / "folds.parquet")["fold"].to_numpy()
        test = folds == NO_FOLD
        truth = pd.read_parquet(Path(cfg.data.root) / "signal.parquet").set_index(KEY)
        y_te = truth.loc[X.loc[test, KEY], "label"].to_numpy()
        neural_cols = [c for c, f in families.items() if f == NEURAL_PRED]
        base_cfg = stack_config(cfg, neural_cols)
        base = X.drop(columns=[KEY]).astype(np.float32)
        for lever in a.levers.split(","):
            scfg, feats, cats = variant(lever, base_cfg, base, categorical, families)
            if not scfg.neural_columns:
                feats = feats.drop(columns=[c for c in neural_cols if c in feats.columns])
            start = time.perf_counter()
            result = run_stack(feats, y, folds, cats, scfg, progress=False)
            s = scores(y_te, result.test["blend"].to_numpy())
            oof = scores(y[~test], result.oof["blend"].to_numpy())
            rows.append({"run": run.parent.name, "lever": lever, "test_src": round(s["src"], 4),
                         "test_mae": round(s["mae"], 4), "oof_src": round(oof["src"], 4),
                         "seconds": round(time.perf_counter() - start, 1)})
            print_table(rows[-1:], "")
    print_table(rows, "stack levers (test split)")
    write_results(a.name, {"rows": rows})


if __name__ == "__main__":
    main()
