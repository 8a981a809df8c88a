"""Stage 5, stack: tabular + extracted neural features + neural predictions -> the K-fold stack."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from datamodules.folds import read_folds
from datamodules.schema import KEY, LABEL, NO_FOLD
from features.build import read_schema
from features.families import ABLATION_GROUPS, NEURAL_PRED
from datamodules.atomic import atomic_path
from pipeline.manifest import StageResult
from stacking.ablation import run_ablations
from stacking.stack import StackConfig, run_stack

log = logging.getLogger("popstack")


def stack_inputs(run_dir: Path) -> tuple[pd.DataFrame, dict[str, str], list[str]]:
    """All stack columns keyed by post id (posts order), their families, and the categorical columns."""
    features = pd.read_parquet(run_dir / "features" / "features.parquet")
    schema = read_schema(run_dir / "features")
    families = dict(schema["families"])
    frames = [features]
    neural_dir = run_dir / "neural"
    if (neural_dir / "features.parquet").is_file():
        for name in ("features.parquet", "predictions.parquet"):
            frame = pd.read_parquet(neural_dir / name)
            if frame[KEY].tolist() != features[KEY].tolist():
                raise ValueError(f"{neural_dir / name}: rows do not match the feature table")
            frames.append(frame.drop(columns=[KEY]))
        families.update(json.loads((neural_dir / "families.json").read_text()))
    return pd.concat(frames, axis=1), families, list(schema["categorical"])


def stack_config(cfg: DictConfig, neural_columns: list[str]) -> StackConfig:
    s = OmegaConf.to_container(cfg.stacking, resolve=True)
    members = {name: params for name, params in s["members"].items() if params.pop("enabled", True)}
    return StackConfig(
        members=members, neural_columns=neural_columns if s["use_neural_members"] else [], blend=s["blend"],
        caruana_size=s["caruana_size"], pseudo_rounds=s["pseudo_rounds"], pseudo_alpha=s["pseudo_alpha"],
        iqr_k=s["iqr_k"], selection_fraction=s["selection_fraction"], selection_member=s["selection_member"],
        seed=int(cfg.seed),
    )


def stack(cfg: DictConfig, run_dir: Path, tracker) -> StageResult:
    """The stack stage; ``stack/`` is written under a temporary name and replaces the old one when complete."""
    with atomic_path(run_dir / "stack") as out:
        return _stack(cfg, run_dir, tracker, out)


def _stack(cfg: DictConfig, run_dir: Path, tracker, out: Path) -> StageResult:
    X, families, categorical = stack_inputs(run_dir)
    y = pd.read_parquet(run_dir / "posts.parquet", columns=[LABEL])[LABEL].to_numpy()
    folds = read_folds(run_dir / "folds.parquet")["fold"].to_numpy()
    neural_cols = [c for c, f in families.items() if f == NEURAL_PRED]
    scfg = stack_config(cfg, neural_cols)
    features = X.drop(columns=[KEY]).astype(np.float32)
    if not scfg.neural_columns:
        features = features.drop(columns=neural_cols)
    loss_file = run_dir / "neural" / "class_loss.parquet"  # the prompt/prototype module's, for loss-based selection
    losses = pd.read_parquet(loss_file)["class_loss"].to_numpy() if loss_file.is_file() else None
    result = run_stack(features, y, folds, categorical, scfg, progress=bool(cfg.progress_bar),
                       selection_losses=losses)
    result.save(out / "model")
    labelled = folds != NO_FOLD
    pred = np.empty(len(X))
    pred[labelled] = result.oof["blend"].to_numpy()
    pred[~labelled] = result.test["blend"].to_numpy()
    members = pd.DataFrame(index=range(len(X)), columns=result.member_names, dtype=float)
    members.loc[labelled, :] = result.oof[result.member_names].to_numpy()
    members.loc[~labelled, :] = result.test[result.member_names].to_numpy()
    frame = pd.concat([pd.DataFrame({KEY: X[KEY], "prediction": pred}), members], axis=1)
    frame.to_parquet(out / "predictions.parquet", index=False)
    n_fits = max(len(result.blend_params), 1)  # folds of the final round
    result.scores.assign(seconds_per_fold=(result.scores.seconds / n_fits).round(2)).to_csv(out / "scores.csv",
                                                                                          index=False)
    result.rounds.to_csv(out / "pseudo_rounds.csv", index=False)
    result.weights.to_csv(out / "blend_weights.csv", index=False)
    if len(result.importance):
        result.importance.rename("importance").rename_axis("feature").reset_index().to_csv(
            out / "importance.csv", index=False)
    outputs = ["stack"]
    ab = cfg.stacking.ablation
    if ab.enabled:
        ab_cfg = scfg
        if ab.members:
            ab_cfg = StackConfig(**{**scfg.__dict__, "members": {m: scfg.members[m] for m in ab.members}})
        table = run_ablations(features, y, folds, categorical, families, ABLATION_GROUPS, ab_cfg,
                              tuple(ab.variants), full=None if ab.members else result,
                              selection_losses=losses)
        table.to_csv(out / "ablation.csv", index=False)
        log.info("ablations:\n%s", table.to_string(index=False))
    if tracker is not None:
        for row in result.scores.itertuples():
            tracker.summary({f"stack/{row.member}/src": row.src, f"stack/{row.member}/mae": row.mae})
    blend = result.scores.set_index("member").loc["blend"]
    return StageResult(outputs=outputs, counts={"stack_columns": features.shape[1]},
                       metrics={"src": float(blend.src), "mae": float(blend.mae)})
