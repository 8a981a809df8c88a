"""Stage 4, extract: every post's F vector (PCA-reduced) and neural predictions from the fold checkpoints
(out-of-fold for posts with a fold, the fold mean for the others), written for the stack."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from popstack.datamodules.atomic import atomic_path, atomic_write_json
from popstack.datamodules.folds import read_folds
from popstack.datamodules.schema import KEY, LABEL, NO_FOLD
from popstack.features.families import NEURAL_PRED
from popstack.pipeline.distributed import topology
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import StageResult
from popstack.pipeline.neural import images_readable, model_identity, neural_outputs, save_extract_state
from popstack.pipeline.stages.base import StageContext, no_outside_inputs

log = logging.getLogger("popstack")

outside_inputs = no_outside_inputs


def config(c: dict) -> dict:
    return {"model": model_identity(c["model"])}


def run(ctx: StageContext) -> StageResult:
    cfg, layout = ctx.cfg, ctx.layout
    state: dict = {}
    extras: dict = {}
    nf, preds = neural_outputs(cfg, layout, layout, state, extras, images=images_readable(layout))
    if not topology().is_zero:  # the other ranks took part in trainer.predict; the first process writes the results
        return StageResult(outputs=[])
    outputs = [RunLayout.neural_features, RunLayout.neural_predictions, RunLayout.neural_families,
               RunLayout.extract_state]
    for path, frame in ((layout.neural_features, nf), (layout.neural_predictions, preds)):
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
    if "class_loss" in extras:  # ranks training rows for loss-based selection (CMPA-DGPL §4.2); not a feature
        with atomic_path(layout.class_loss) as tmp:
            pd.DataFrame({KEY: nf[KEY], "class_loss": extras["class_loss"]}).to_parquet(tmp, index=False)
        outputs.append(RunLayout.class_loss)
    if extras.get("fold_predictions"):  # fold-pure pseudo-labels (stacking.stack.fold_pseudo_labels); not features
        unlabelled = read_folds(layout.folds).query("fold == @NO_FOLD")[KEY].tolist()
        with atomic_path(layout.fold_predictions) as tmp:
            fold_predictions_frame(extras["fold_predictions"], unlabelled).to_parquet(tmp, index=False)
        outputs.append(RunLayout.fold_predictions)
    save_extract_state(state, layout.extract_state)
    metrics = out_of_fold_scores(layout, preds)
    families = {c: c.split("__", 1)[0] for c in nf.columns if c != KEY}
    families.update({c: NEURAL_PRED for c in preds.columns if c != KEY})
    atomic_write_json(layout.neural_families, families)
    counts = {"neural_feature_columns": len(nf.columns) - 1, "prediction_columns": len(preds.columns) - 1}
    return StageResult(outputs=outputs, counts=counts, metrics=metrics)


def out_of_fold_scores(layout: RunLayout, preds: pd.DataFrame) -> dict[str, float]:
    """SRC and MAE of each neural prediction column on the posts with a fold (held-back labels stay unread)."""
    from popstack.stacking.metrics import scores

    labels = pd.read_parquet(layout.posts, columns=[LABEL])[LABEL].to_numpy()
    in_fold = read_folds(layout.folds)["fold"].to_numpy() != NO_FOLD
    metrics = {f"{c}/{k}": v for c in preds.columns if c != KEY
               for k, v in scores(labels[in_fold], preds.loc[in_fold, c].to_numpy()).items()}
    for k, v in metrics.items():
        log.info("extract: out-of-fold %s = %.4f", k, v)
    return metrics


def fold_predictions_frame(per_column: dict[str, dict[int, np.ndarray]], post_ids: list[str]) -> pd.DataFrame:
    """``unlabelled_by_fold`` of each prediction column as one long table: ``post_id, fold, <column>...``."""
    folds = sorted(next(iter(per_column.values())))
    return pd.DataFrame({KEY: np.tile(np.asarray(post_ids, dtype=object), len(folds)),
                         "fold": np.repeat(np.asarray(folds, dtype=np.int64), len(post_ids)),
                         **{c: np.concatenate([v[k] for k in folds]) for c, v in per_column.items()}})
