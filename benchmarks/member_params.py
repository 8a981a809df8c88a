"""One stack member alone, with a few parameter variants, on the stack inputs of a finished run: out-of-fold MAE/SRC
over the run's folds (every labelled row with a fold; no IQR filter, no pseudo-labels, no neural prediction
columns), each fold's best round count, and the share of out-of-fold predictions outside the fold's training label
range widened by the run's ``stacking.guard.label_margin`` (``outside``: the bounds the stack's range guard applies
to test rows, ``label_bounds``) with the lowest and highest prediction.

    python benchmarks/member_params.py RUN --member xgboost \\
        --variants "min_child_weight=1;min_child_weight=20;min_child_weight=40"

A variant is ``key=value[,key=value...]`` over the member's params (the run's ``stacking.members.<member>``);
values are read as YAML (``true``, ``0.05``, ``reg:squarederror``); ``default`` is the run's params unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from common import print_table, write_results


def parse_variant(text: str) -> dict:
    if text.strip() == "default":
        return {}
    pairs = [part.split("=", 1) for part in text.split(",")]
    return {k.strip(): yaml.safe_load(v) for k, v in pairs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--member", default="xgboost")
    p.add_argument("--variants", default="default")
    p.add_argument("--name", default="member_params")
    a = p.parse_args()
    from popstack.datamodules.folds import read_folds
    from popstack.datamodules.schema import KEY, LABEL, NO_FOLD
    from popstack.features.families import NEURAL_PRED
    from popstack.pipeline.config import load_run_config
    from popstack.pipeline.layout import RunLayout
    from popstack.pipeline.stages.stack import stack_config, stack_inputs
    from popstack.stacking.members import label_bounds, make_member
    from popstack.stacking.metrics import scores

    layout = RunLayout(a.run)
    X, families, categorical = stack_inputs(layout)
    y = pd.read_parquet(layout.posts, columns=[LABEL])[LABEL].to_numpy()
    folds = read_folds(layout.folds)["fold"].to_numpy()
    X = X.drop(columns=[KEY] + [c for c, f in families.items() if f == NEURAL_PRED and c in X.columns])
    X = X.astype(np.float32)
    stack_cfg = stack_config(load_run_config(a.run), [])
    base, margin = stack_cfg.params(a.member), float(stack_cfg.guard.label_margin)
    labelled = folds != NO_FOLD
    rows = []
    for text in a.variants.split(";"):
        params = dataclasses.replace(base, **parse_variant(text))
        oof, rounds, start = np.full(len(y), np.nan), [], time.perf_counter()
        outside = np.zeros(len(y), dtype=bool)
        for k in sorted(np.unique(folds[labelled])):
            tr, va = labelled & (folds != k), folds == k
            member = make_member(a.member, params, categorical, seed=0).fit(X[tr], y[tr], X[va], y[va])
            oof[va] = member.predict(X[va])
            lo, hi = label_bounds(y[tr], margin)
            outside[va] = (oof[va] < lo) | (oof[va] > hi)
            rounds.append(member.best_rounds() if hasattr(member, "best_rounds") else None)
        s = scores(y[labelled], oof[labelled])
        rows.append({"member": a.member, "variant": text, "oof_src": round(s["src"], 4),
                     "oof_mae": round(s["mae"], 4), "rounds": rounds,
                     "outside": round(float(outside[labelled].mean()), 4),
                     "pred_min_max": (round(float(np.nanmin(oof)), 2), round(float(np.nanmax(oof)), 2)),
                     "seconds": round(time.perf_counter() - start, 1)})
        print_table(rows[-1:], "")
    print_table(rows, f"{a.member} alone on {a.run}")
    write_results(a.name, {"rows": rows})


if __name__ == "__main__":
    main()
