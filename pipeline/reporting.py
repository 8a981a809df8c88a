"""Stage 6, report: scores, plots, ``report.md``, W&B, ``submission.json`` and ``predictions.parquet``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from datamodules.atomic import atomic_path
from datamodules.schema import KEY, LABEL
from pipeline.manifest import Manifest, StageResult
from pipeline.report import (
    markdown_table,
    plot_feature_importance,
    plot_prediction_distribution,
    print_summary,
    write_report,
    write_submission,
)

log = logging.getLogger("popstack")


def report(cfg: DictConfig, run_dir: Path, tracker, manifests: dict[str, Manifest]) -> StageResult:
    stack_dir = run_dir / "stack"
    scores = pd.read_csv(stack_dir / "scores.csv")
    preds = pd.read_parquet(stack_dir / "predictions.parquet")
    posts = pd.read_parquet(run_dir / "posts.parquet", columns=[KEY, "split", "row"])
    preds = posts.merge(preds[[KEY, "prediction"]], on=KEY, how="left", validate="one_to_one")
    missing = preds.prediction.isna()
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} posts have no prediction, e.g. {preds.loc[missing, KEY].head(3).tolist()}")

    labels = pd.read_parquet(run_dir / "posts.parquet", columns=[KEY, LABEL])
    preds = preds.merge(labels, on=KEY)
    with atomic_path(run_dir / "predictions.parquet") as tmp:
        preds[["post_id", "split", "prediction", "label"]].to_parquet(tmp, index=False)

    test = preds[preds.split == "test"].sort_values("row")
    write_submission(
        test[KEY].tolist(), test.prediction.to_numpy(), run_dir / "submission.json",
        details=f"popstack {cfg.name}: backbone {cfg.backbone.name} ({cfg.backbone.pretrained or 'random init'})",
    )

    labelled = preds[preds[LABEL].notna()]
    outputs = ["predictions.parquet", "submission.json", "report.md"]
    sections = [("Out-of-fold scores (labelled posts)", markdown_table(scores))]
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
        tracker.summary({"oof/src": float(blend.src), "oof/mae": float(blend.mae), "test_posts": len(test)})
        tracker.table("scores", scores)
        for name in ("ablation.csv", "pseudo_rounds.csv"):
            if (stack_dir / name).is_file():
                tracker.table(name.removesuffix(".csv"), pd.read_csv(stack_dir / name))
        for png in outputs:
            if png.endswith(".png"):
                tracker.image(f"plots/{png.removesuffix('.png')}", run_dir / png)
        tracker.artifact("submission", "submission", [run_dir / "submission.json", run_dir / "predictions.parquet"],
                         run_dir)
        checkpoints = sorted((run_dir / "neural").glob("*/fold*/checkpoints/best.ckpt"))
        if checkpoints:
            tracker.artifact("neural-checkpoints", "model", checkpoints, run_dir)
        tracker.artifact("stacker", "model", [stack_dir / "model", run_dir / "config.yaml"], run_dir)

    print_summary(scores, stage_seconds)
    log.info("report: %s", run_dir / "report.md")
    blend_row = scores[scores.member == "blend"]
    metrics = {} if blend_row.empty else {"src": float(blend_row.src.iloc[0]), "mae": float(blend_row.mae.iloc[0])}
    return StageResult(outputs=outputs, counts={"test_predictions": len(test), "labelled": len(labelled)},
                       metrics=metrics)
