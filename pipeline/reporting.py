"""Stage 6, report: scores, plots, ``report.md``, W&B, ``submission.json`` and ``predictions.parquet``.

Scores come in two columns per member and for the blend: out-of-fold on the posts with a fold, and on the
held-back chronological slice (``folds.holdout_fraction``: posts that no fit, early stopping, checkpoint choice or
blend weight saw; their predictions are the fold means, as for test posts), so the optimism of the out-of-fold
figure shows. The report names the fold strategy that produced them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from datamodules.atomic import atomic_path
from datamodules.folds import HOLDOUT, read_folds
from datamodules.schema import KEY, LABEL, NO_FOLD
from pipeline.manifest import Manifest, StageResult
from pipeline.report import (
    markdown_table,
    plot_feature_importance,
    plot_prediction_distribution,
    print_summary,
    write_report,
)
from pipeline.submission import write_submission

log = logging.getLogger("popstack")


def score_table(oof_scores: pd.DataFrame, stack_preds: pd.DataFrame, labels: np.ndarray,
                held: np.ndarray) -> pd.DataFrame:
    """``member, oof_src, oof_mae, heldback_src, heldback_mae, seconds``: the stack's out-of-fold scores next to
    each member's (and the blend's, column ``prediction``) scores on the held-back rows (NaN when there are none).

    ``stack_preds``: ``stack/predictions.parquet`` in posts order; ``labels`` (n,); ``held`` (n,) bool."""
    from stacking.metrics import scores

    rows = []
    for r in oof_scores.itertuples(index=False):
        col = "prediction" if r.member == "blend" else r.member
        hb = scores(labels[held], stack_preds[col].to_numpy()[held]) if held.any() else {"src": np.nan, "mae": np.nan}
        rows.append({"member": r.member, "oof_src": r.src, "oof_mae": r.mae, "heldback_src": hb["src"],
                     "heldback_mae": hb["mae"], "seconds": r.seconds})
    return pd.DataFrame(rows)


def folds_line(cfg: DictConfig, folds: pd.DataFrame, postdate: np.ndarray) -> str:
    """One sentence: the fold strategy, K, and the held-back slice (size and date range)."""
    held = folds[HOLDOUT].to_numpy()
    n_fold = int((folds.fold.to_numpy() != NO_FOLD).sum())
    text = (f"Fold strategy **{cfg.folds.strategy}**, {cfg.n_folds} folds over {n_fold} labelled posts (out-of-fold "
            f"scores). ")
    if held.any():
        day = pd.to_datetime(postdate[held], unit="s")
        text += (f"Held-back chronological slice: the last {cfg.folds.holdout_fraction:.0%} of the labelled posts "
                 f"by date, {int(held.sum())} posts from {day.min():%Y-%m-%d} to {day.max():%Y-%m-%d}, never used "
                 f"for fitting, early stopping, checkpoint choice or blend weights; scored here only.")
    else:
        text += "No held-back slice (folds.holdout_fraction=0)."
    return text


def report(cfg: DictConfig, run_dir: Path, tracker, manifests: dict[str, Manifest]) -> StageResult:
    stack_dir = run_dir / "stack"
    posts_all = pd.read_parquet(run_dir / "posts.parquet", columns=[KEY, LABEL, "postdate"])
    folds = read_folds(run_dir / "folds.parquet")
    if folds[KEY].tolist() != posts_all[KEY].tolist():
        raise RuntimeError(f"{run_dir / 'folds.parquet'}: rows do not match posts.parquet")
    stack_preds = pd.read_parquet(stack_dir / "predictions.parquet").set_index(KEY).reindex(posts_all[KEY]).reset_index()
    missing = stack_preds.prediction.isna()
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} posts have no prediction, e.g. "
                           f"{stack_preds.loc[missing, KEY].head(3).tolist()}")
    held = folds[HOLDOUT].to_numpy()
    scores = score_table(pd.read_csv(stack_dir / "scores.csv"), stack_preds, posts_all[LABEL].to_numpy(), held)
    fold_text = folds_line(cfg, folds, posts_all.postdate.to_numpy())
    log.info("report: %s", fold_text.replace("**", ""))
    posts = pd.read_parquet(run_dir / "posts.parquet", columns=[KEY, "split", "row"])
    preds = posts.assign(prediction=stack_preds.prediction.to_numpy(), label=posts_all[LABEL].to_numpy())
    with atomic_path(run_dir / "predictions.parquet") as tmp:
        preds[["post_id", "split", "prediction", "label"]].to_parquet(tmp, index=False)

    test = preds[preds.split == "test"].sort_values("row")
    write_submission(
        test[KEY].tolist(), test.prediction.to_numpy(), run_dir / "submission.json",
        details=f"popstack {cfg.name}: backbone {cfg.backbone.name} ({cfg.backbone.pretrained or 'random init'})",
    )

    labelled = preds[preds[KEY].isin(folds.loc[folds.fold != NO_FOLD, KEY])]
    outputs = ["predictions.parquet", "submission.json", "report.md"]
    sections = [("Scores: out-of-fold and held-back slice", fold_text + "\n\n" + markdown_table(scores))]
    dist_png = plot_prediction_distribution(
        labelled[LABEL].to_numpy(), labelled.prediction.to_numpy(), run_dir / "prediction_distribution.png",
        "Out-of-fold blend vs ground truth",
    )
    outputs.append(dist_png.name)
    sections.append(("Predicted vs true distribution", f"![distribution]({dist_png.name})"))

    importance_csv = stack_dir / "importance.csv"
    if importance_csv.is_file():
        importance = pd.read_csv(importance_csv).set_index("feature")["importance"]
        imp_png = plot_feature_importance(importance, run_dir / "feature_importance.png")
        outputs.append(imp_png.name)
        top = (importance / importance.sum() * 100).sort_values(ascending=False).head(20)
        table = pd.DataFrame({"rank": range(1, len(top) + 1), "feature": top.index, "importance_%": top.to_numpy()})
        sections.append(("Top-20 features", f"![importance]({imp_png.name})\n\n" + markdown_table(table, ".2f")))
    for name, title in (("pseudo_rounds.csv", "Pseudo-labelling rounds"), ("ablation.csv", "Ablations (HyperFusion Table 1)"),
                        ("blend_weights.csv", "Blend weights per fold")):
        path = stack_dir / name
        if path.is_file():
            sections.append((title, markdown_table(pd.read_csv(path))))
    stage_seconds = {name: m.seconds for name, m in manifests.items()}
    sections.append(("Time per stage", markdown_table(pd.DataFrame(
        {"stage": list(stage_seconds), "seconds": list(stage_seconds.values())}), ".1f")))
    counts = manifests["prepare"].counts if "prepare" in manifests else {}
    if counts:
        sections.append(("Data", markdown_table(pd.DataFrame({"count": list(counts), "value": list(counts.values())}))))
    write_report(run_dir / "report.md", sections)

    if tracker is not None:
        blend = scores[scores.member == "blend"].iloc[0] if (scores.member == "blend").any() else scores.iloc[0]
        tracker.summary({"oof/src": float(blend.oof_src), "oof/mae": float(blend.oof_mae),
                         "heldback/src": float(blend.heldback_src), "heldback/mae": float(blend.heldback_mae),
                         "folds/strategy": str(cfg.folds.strategy), "test_posts": len(test)})
        tracker.table("scores", scores)
        for name in ("ablation.csv", "pseudo_rounds.csv"):
            if (stack_dir / name).is_file():
                tracker.table(name.removesuffix(".csv"), pd.read_csv(stack_dir / name))
        for png in outputs:
            if png.endswith(".png"):
                tracker.image(f"plots/{png.removesuffix('.png')}", run_dir / png)
        tracker.log_run_artifacts()

    print_summary(scores, stage_seconds)
    log.info("report: %s", run_dir / "report.md")
    blend_row = scores[scores.member == "blend"]
    metrics = {} if blend_row.empty else {
        "src": float(blend_row.oof_src.iloc[0]), "mae": float(blend_row.oof_mae.iloc[0]),
        "heldback_src": float(blend_row.heldback_src.iloc[0]), "heldback_mae": float(blend_row.heldback_mae.iloc[0])}
    return StageResult(outputs=outputs, counts={"test_predictions": len(test), "labelled": len(labelled),
                                                "heldback": int(held.sum())},
                       metrics=metrics)
