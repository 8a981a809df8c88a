"""Stack-level levers judged on held-out data: rerun the stack of a finished run with one change at a time and
score the test split against the labels the data directory keeps aside (``signal.parquet``).

    python benchmarks/quality.py --worlds 1 --sizes 2000 --workdir W ...     # keeps W/<case>/run
    python benchmarks/quality_levers.py W/world1-2000/run [W/world2-2000/run ...] [--levers default,no_tabnet]

Levers (each against ``default``, the run's own stacking config; ``a+b`` applies both):
no_neural_members (neural predictions leave the blend), no_tabnet, no_pseudo (0 pseudo-label rounds),
no_iqr (IQR filter off), blend_mae / blend_ridge (instead of the configured blend), no_image_stats (the
image-statistics family dropped), no_native_cats (category/user codes as plain numbers, not categoricals),
no_prompt_prototype (the prompt/prototype module's F-vector columns and prediction dropped), no_hierarchical and
no_co_attention (that module's prediction dropped); the tabular core (issue 22): lgb_all_cats (LightGBM splits
every categorical natively, user ids included, instead of only those with <= 1,000 levels), lgb_xt / lgb_rf (a
LightGBM of extremely randomised trees / a LightGBM random forest joins the stack, ``CANDIDATES``), no_trend (the
absolute position in time, ``temporal.days_since_start``, dropped: trees cannot extrapolate it past the training
period).

Scored separately: the test split (posts.split == "test") and the held-back chronological slice of the labelled
posts (``folds.holdout_fraction``), both against the labels ``signal.parquet`` keeps; and the out-of-fold blend.
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
          "no_image_stats", "no_native_cats", "no_prompt_prototype", "no_hierarchical", "no_co_attention",
          "lgb_all_cats", "lgb_xt", "lgb_rf", "no_trend")


#: Tabular-core candidates (issue 22), tried as levers only: measured, none earned a default (benchmarks/README.md).
#: Each is a LightGBM with other params (LightGBM options its params do not name go under ``extra``), registered
#: under its own member name for the lever's refit.
CANDIDATES = {
    "lightgbm_xt": {"objective": "huber", "alpha": 1.0, "learning_rate": "auto", "extra": {"extra_trees": True},
                    "num_leaves": 63, "min_data_in_leaf": 10, "feature_fraction": 0.7, "max_bin": 63,
                    "n_estimators": 3000, "early_stopping_rounds": 50, "num_threads": "auto"},
    "lightgbm_rf": {"objective": "huber", "alpha": 1.0, "learning_rate": 0.1, "num_leaves": 255,
                    "min_data_in_leaf": 5, "extra": {"boosting": "rf", "bagging_freq": 1, "bagging_fraction": 0.632},
                    "feature_fraction": 0.5, "max_bin": 63, "n_estimators": 300, "early_stopping_rounds": 50,
                    "num_threads": "auto"},
}


def register_candidates() -> None:
    """Register the candidate names as members (LightGBM subclasses; one with every categorical native) for this
    process only; ``with_members`` puts them into a stack config. ``stacking.config`` is imported first, so the
    run's stack config (``StackConfig.members``) holds the shipped members only."""
    import popstack.stacking.config  # noqa: F401
    from popstack.stacking.members import register_member
    from popstack.stacking.members.lightgbm import LightGBMMember

    class WideCategoricalLightGBM(LightGBMMember):
        max_cat_levels = 2**31 - 1

    for name in CANDIDATES:
        register_member(name)(type(f"Candidate_{name}", (LightGBMMember,), {}))
    register_member("lightgbm_all_cats")(WideCategoricalLightGBM)


def with_members(scfg, members: dict):
    """``scfg`` fitting exactly ``members`` ({name: params}; the candidates' names included)."""
    fields = [(name, type(params)) for name, params in members.items()]
    lever_members = dataclasses.make_dataclass("LeverMembers", fields)
    enabled = {name: dataclasses.replace(params, enabled=True) for name, params in members.items()}
    return dataclasses.replace(scfg, members=lever_members(**enabled))


def variant(lever: str, scfg, features: pd.DataFrame, categorical: list[str], families: dict[str, str]):
    """(stack config, features, categorical columns) with ``lever`` (or ``a+b+...``) applied."""
    from popstack.features.families import IMAGE_STATS, PROMPT
    from popstack.lightning_modules.registry import module_specs  # a lever drops a module's column, pred_<name>

    if "+" in lever:
        for part in lever.split("+"):
            scfg, features, categorical = variant(part, scfg, features, categorical, families)
        return scfg, features, categorical
    if lever.removeprefix("no_") in module_specs():
        module = lever.removeprefix("no_")
        drop = [f"pred_{module}"] + ([c for c in features.columns if families.get(c) == PROMPT]
                                     if module == "prompt_prototype" else [])
        features = features.drop(columns=[c for c in drop if c in features.columns])
        scfg = dataclasses.replace(scfg, neural_columns=[c for c in scfg.neural_columns if c not in drop])
    elif lever == "no_neural_members":
        scfg = dataclasses.replace(scfg, neural_columns=[])
    elif lever == "no_tabnet":
        scfg = scfg.only([n for n in scfg.fitted_members() if n != "tabnet"])
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
    elif lever == "lgb_all_cats":
        members = {("lightgbm_all_cats" if k == "lightgbm" else k): v for k, v in scfg.fitted_members().items()}
        scfg = with_members(scfg, members)
    elif lever in ("lgb_xt", "lgb_rf"):
        name = "lightgbm_" + lever.removeprefix("lgb_")
        from popstack.stacking.members.lightgbm import LightGBMParams

        scfg = with_members(scfg, {**scfg.fitted_members(), name: LightGBMParams(**CANDIDATES[name])})
    elif lever == "no_trend":
        from popstack.features.families import TEMPORAL, column_name

        features = features.drop(columns=[column_name(TEMPORAL, "days_since_start")], errors="ignore")
    elif lever != "default":
        raise SystemExit(f"unknown lever {lever!r}; levers: {', '.join(LEVERS)}")
    return scfg, features, categorical


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--levers", default=",".join(LEVERS))
    p.add_argument("--name", default="quality_levers")
    a = p.parse_args()
    register_candidates()
    from popstack.datamodules.folds import read_folds
    from popstack.datamodules.schema import KEY, LABEL, NO_FOLD
    from popstack.features.families import NEURAL_PRED
    from popstack.pipeline.config import load_run_config
    from popstack.pipeline.layout import RunLayout
    from popstack.pipeline.stages.stack import latest_rows, stack_config, stack_inputs
    from popstack.stacking.metrics import scores
    from popstack.stacking.stack import run_stack

    rows = []
    for run in a.runs:
        cfg = load_run_config(run)
        X, families, categorical = stack_inputs(RunLayout(run))
        posts = pd.read_parquet(run / "posts.parquet", columns=[LABEL, "split", "postdate"])
        y, split = posts[LABEL].to_numpy(), posts["split"].to_numpy()
        folds = read_folds(run / "folds.parquet")["fold"].to_numpy()
        unlabelled = folds == NO_FOLD  # the rows run_stack predicts as "test": test split + held-back slice
        truth = pd.read_parquet(Path(cfg.data.root) / "signal.parquet").set_index(KEY)
        y_un = truth.loc[X.loc[unlabelled, KEY], "label"].to_numpy()
        is_test = split[unlabelled] == "test"
        neural_cols = [c for c, f in families.items() if f == NEURAL_PRED]
        base_cfg = stack_config(cfg, neural_cols)
        base = X.drop(columns=[KEY]).astype(np.float32)
        for lever in a.levers.split(","):
            scfg, feats, cats = variant(lever, base_cfg, base, categorical, families)
            if not scfg.neural_columns:
                feats = feats.drop(columns=[c for c in neural_cols if c in feats.columns])
            start = time.perf_counter()
            result = run_stack(feats, y, folds, cats, scfg, progress=False,
                               latest=latest_rows(folds, posts["postdate"].to_numpy()))
            pred = result.test["blend"].to_numpy()
            s = scores(y_un[is_test], pred[is_test])
            held = scores(y_un[~is_test], pred[~is_test]) if (~is_test).any() else {"src": np.nan, "mae": np.nan}
            oof = scores(y[~unlabelled], result.oof["blend"].to_numpy())
            rows.append({"run": run.name if run.name != "run" else run.parent.name, "lever": lever,
                         "test_src": round(s["src"], 4), "test_mae": round(s["mae"], 4),
                         "held_src": round(held["src"], 4), "held_mae": round(held["mae"], 4),
                         "oof_src": round(oof["src"], 4), "seconds": round(time.perf_counter() - start, 1)})
            print_table(rows[-1:], "")
    print_table(rows, "stack levers (test split)")
    write_results(a.name, {"rows": rows})


if __name__ == "__main__":
    main()
