"""HyperFusion Table 1 ablations: one call runs the variants and returns SRC/MAE per variant.

Variants: ``full``; ``w/o <group>`` for the feature groups of ``features.families.ABLATION_GROUPS`` (their
families' columns are dropped; neural prediction members count as visual: they see the image); ``w/o ensemble``
(the best single member of the full run, by out-of-fold SRC); ``w/o pseudo label`` (no pseudo-labelling rounds);
``w/o filter`` (no IQR filter, no loss-based selection); ``w/o 5-fold`` (one hold-out split: fold 0 validates,
the rest trains; scored on fold 0).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pandas as pd

from popstack.stacking.config import VARIANTS, StackConfig
from popstack.stacking.stack import StackResult, run_stack

log = logging.getLogger("popstack")


def _blend_row(variant: str, result: StackResult, seconds: float) -> dict:
    row = result.scores.set_index("member").loc["blend"]
    return {"variant": variant, "src": float(row.src), "mae": float(row.mae), "seconds": round(seconds, 1)}


def run_ablations(
    X: pd.DataFrame, y: np.ndarray, folds: np.ndarray, categorical: list[str], families: dict[str, str],
    groups: dict[str, tuple[str, ...]], cfg: StackConfig, variants: tuple[str, ...] = VARIANTS,
    full: StackResult | None = None, selection_losses: np.ndarray | None = None,
) -> pd.DataFrame:
    """Run ``variants``; ``full`` reuses an already fitted full stack; ``selection_losses`` (n,) rank rows for
    loss-based selection as in ``run_stack``. Returns variant, src, mae, seconds."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {VARIANTS}")
    rows = []
    if full is None:
        start = time.perf_counter()
        full = run_stack(X, y, folds, categorical, cfg, selection_losses=selection_losses)
        full_seconds = time.perf_counter() - start
    else:
        full_seconds = float("nan")
    for variant in variants:
        start = time.perf_counter()
        if variant == "full":
            rows.append(_blend_row(variant, full, full_seconds))
            continue
        if variant == "w/o ensemble":
            members = full.scores[full.scores.member != "blend"].sort_values("src", ascending=False).iloc[0]
            rows.append({"variant": f"{variant} ({members.member})", "src": float(members.src),
                         "mae": float(members.mae), "seconds": 0.0})
            continue
        vcfg, Xv, eval_folds = cfg, X, None
        if variant.startswith("w/o ") and variant[4:] in groups:
            drop_fams = set(groups[variant[4:]])
            drop = [c for c, f in families.items() if f in drop_fams and c in X.columns]
            neural = [] if variant[4:] == "visual" else list(cfg.neural_columns)
            Xv = X.drop(columns=drop + [c for c in cfg.neural_columns if c not in neural])
            vcfg = dataclasses.replace(cfg, neural_columns=neural)
        elif variant == "w/o pseudo label":
            vcfg = dataclasses.replace(cfg, pseudo_rounds=0)
        elif variant == "w/o filter":
            vcfg = dataclasses.replace(cfg, iqr_k=0.0, selection_fraction=1.0)
        elif variant == "w/o 5-fold":
            eval_folds = [int(np.min(folds[folds >= 0]))]
        log.info("ablation: %s", variant)
        result = run_stack(Xv, y, folds, [c for c in categorical if c in Xv.columns], vcfg, eval_folds=eval_folds,
                           selection_losses=selection_losses)
        rows.append(_blend_row(variant, result, time.perf_counter() - start))
    return pd.DataFrame(rows)
