"""Stage 5, stack: tabular + extracted neural features + neural predictions -> the K-fold stack."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from popstack.datamodules.atomic import atomic_path
from popstack.datamodules.folds import read_folds
from popstack.datamodules.schema import KEY, LABEL, NO_FOLD
from popstack.features.build import read_schema
from popstack.features.families import ABLATION_GROUPS, NEURAL_PRED
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import StageResult
from popstack.pipeline.stages.base import StageContext, common_config, no_outside_inputs
from popstack.stacking.ablation import run_ablations
from popstack.stacking.config import StackConfig
from popstack.stacking.stack import run_stack

log = logging.getLogger("popstack")


outside_inputs = no_outside_inputs


def config(c: dict) -> dict:
    return {"stacking": c["stacking"], **common_config(c)}


def stack_inputs(layout: RunLayout) -> tuple[pd.DataFrame, dict[str, str], list[str]]:
    """All stack columns keyed by post id (posts order), their families, and the categorical columns."""
    features = pd.read_parquet(layout.feature_table)
    schema = read_schema(layout.features)
    families = dict(schema["families"])
    frames = [features]
    if layout.neural_features.is_file():
        for path in (layout.neural_features, layout.neural_predictions):
            frame = pd.read_parquet(path)
            if frame[KEY].tolist() != features[KEY].tolist():
                raise ValueError(f"{path}: rows do not match the feature table")
            frames.append(frame.drop(columns=[KEY]))
        families.update(json.loads(layout.neural_families.read_text()))
    return pd.concat(frames, axis=1), families, list(schema["categorical"])


def read_fold_predictions(path: Path, post_ids: list[str]) -> dict[str, dict[int, np.ndarray]]:
    """Inverse of ``fold_predictions_frame`` for the unlabelled posts ``post_ids`` (in that order)."""
    frame = pd.read_parquet(path)
    out: dict[str, dict[int, np.ndarray]] = {}
    for k, part in frame.groupby("fold"):
        part = part.set_index(KEY)
        missing = [p for p in post_ids if p not in part.index]
        if missing:
            raise ValueError(f"{path}: fold {k} has no prediction for unlabelled posts {missing[:5]}")
        for c in part.columns.drop("fold"):
            out.setdefault(c, {})[int(k)] = part.loc[post_ids, c].to_numpy(dtype=np.float64)
    return out


def stack_config(cfg: DictConfig, neural_columns: list[str]) -> StackConfig:
    """The composed ``stacking`` group as its typed config, with the run's neural prediction columns (when
    ``use_neural_members``) and seed."""
    scfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StackConfig), cfg.stacking))
    return dataclasses.replace(scfg, neural_columns=list(neural_columns) if scfg.use_neural_members else [],
                               seed=int(cfg.seed))


def latest_rows(folds: np.ndarray, postdate: np.ndarray) -> np.ndarray:
    """Bool (n,): the last 1/K of the rows with a fold by date (K folds), on which the stack's error guard decides;
    the held-back slice (no fold) is never among them."""
    with_fold = np.flatnonzero(folds != NO_FOLD)
    k = len(np.unique(folds[with_fold]))
    order = with_fold[np.argsort(postdate[with_fold], kind="stable")]
    mask = np.zeros(len(folds), dtype=bool)
    mask[order[len(order) - len(order) // max(k, 1):]] = True
    return mask


def run(ctx: StageContext) -> StageResult:
    """The stack stage; ``stack/`` is written under a temporary name and replaces the old one when complete."""
    layout = ctx.layout
    with atomic_path(layout.stack) as tmp:  # files of stack/ are written into tmp/ under the same names
        return _stack(ctx.cfg, layout, ctx.tracker, lambda path: tmp / path.relative_to(layout.stack))


def _stack(cfg: DictConfig, layout: RunLayout, tracker, staged: Callable[[Path], Path]) -> StageResult:
    X, families, categorical = stack_inputs(layout)
    y = pd.read_parquet(layout.posts, columns=[LABEL])[LABEL].to_numpy()
    folds = read_folds(layout.folds)["fold"].to_numpy()
    neural_cols = [c for c, f in families.items() if f == NEURAL_PRED]
    scfg = stack_config(cfg, neural_cols)
    features = X.drop(columns=[KEY]).astype(np.float32)
    if not scfg.neural_columns:
        features = features.drop(columns=neural_cols)
    loss_file = layout.class_loss  # the prompt/prototype module's, for loss-based selection
    losses = pd.read_parquet(loss_file)["class_loss"].to_numpy() if loss_file.is_file() else None
    postdate = pd.read_parquet(layout.posts, columns=["postdate"])["postdate"].to_numpy()
    per_fold = None  # each neural fold model's predictions of the unlabelled posts, for fold-pure pseudo-labels
    if scfg.neural_columns and layout.fold_predictions.is_file():
        per_fold = read_fold_predictions(layout.fold_predictions, X.loc[folds == NO_FOLD, KEY].tolist())
    result = run_stack(features, y, folds, categorical, scfg, progress=bool(cfg.progress_bar),
                       selection_losses=losses, latest=latest_rows(folds, postdate),
                       neural_unlabelled_by_fold=per_fold)
    result.save(staged(layout.stack_model))
    labelled = folds != NO_FOLD
    pred = np.empty(len(X))
    pred[labelled] = result.oof["blend"].to_numpy()
    pred[~labelled] = result.test["blend"].to_numpy()
    members = pd.DataFrame(index=range(len(X)), columns=result.member_names, dtype=float)
    members.loc[labelled, :] = result.oof[result.member_names].to_numpy()
    members.loc[~labelled, :] = result.test[result.member_names].to_numpy()
    frame = pd.concat([pd.DataFrame({KEY: X[KEY], "prediction": pred}), members], axis=1)
    frame.to_parquet(staged(layout.stack_predictions), index=False)
    n_fits = max(len(result.blend_params), 1)  # folds of the final round
    result.scores.assign(seconds_per_fold=(result.scores.seconds / n_fits).round(2)).to_csv(
        staged(layout.stack_scores), index=False)
    result.rounds.to_csv(staged(layout.pseudo_rounds), index=False)
    result.weights.to_csv(staged(layout.blend_weights), index=False)
    result.dropped.to_csv(staged(layout.dropped_members), index=False)
    pd.DataFrame({"member": list(result.refit_rounds), "rounds": list(result.refit_rounds.values())}).to_csv(
        staged(layout.refit), index=False)
    if len(result.importance):
        result.importance.rename("importance").rename_axis("feature").reset_index().to_csv(
            staged(layout.importance), index=False)
    outputs = [RunLayout.stack]
    ab = scfg.ablation
    if ab.enabled:
        ab_cfg = dataclasses.replace(scfg, refit_full=False)  # variants are scored, never submitted
        if ab.members:
            ab_cfg = ab_cfg.only(ab.members)
        table = run_ablations(features, y, folds, categorical, families, ABLATION_GROUPS, ab_cfg,
                              tuple(ab.variants), full=None if ab.members else result,
                              selection_losses=losses)
        table.to_csv(staged(layout.ablation), index=False)
        log.info("ablations:\n%s", table.to_string(index=False))
    if tracker is not None:
        for row in result.scores.itertuples():
            tracker.summary({f"stack/{row.member}/src": row.src, f"stack/{row.member}/mae": row.mae})
    blend = result.scores.set_index("member").loc["blend"]
    return StageResult(outputs=outputs, counts={"stack_columns": features.shape[1]},
                       metrics={"src": float(blend.src), "mae": float(blend.mae)})
