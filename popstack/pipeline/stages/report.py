"""Stage 6, report: scores, plots, ``report.md``, W&B, ``submission.json`` and ``predictions.parquet``.

Scores come in two columns per member and for the blend: out-of-fold on the posts with a fold, and on the
held-back chronological slice (``folds.holdout_fraction``: posts that no fit, early stopping, checkpoint choice or
blend weight saw; their predictions are the fold means, as for test posts), so the optimism of the out-of-fold
figure shows. The report names the fold strategy that produced them.

The headline (report.md's first section, the console summary's first line, W&B's ``headline/*``) is the blend's
score on the held-back slice: posts later than every post fitted, like the test split. Without a held-back slice it
is the out-of-fold score and says so. The report also names the members the stack's guards left out of the blend
(and why), says loudly when the blend is worse on the held-back slice than its best single member or no better
there than a constant prediction (the median of the fitted labels: the submission is then broken), and says which
test predictions come from the refit on every label (``stacking.refit_full``; all scores are from before it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from popstack.datamodules.atomic import atomic_path
from popstack.datamodules.folds import HOLDOUT, read_folds
from popstack.datamodules.schema import KEY, LABEL, NO_FOLD
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import StageResult
from popstack.pipeline.stages.base import StageContext, no_outside_inputs
from popstack.pipeline.submission import write_submission

log = logging.getLogger("popstack")

outside_inputs = no_outside_inputs
#: Tables of the stack stage shown in the report as they are, with their headings.
STACK_TABLES = ((RunLayout.pseudo_rounds, "Pseudo-labelling rounds"),
                (RunLayout.ablation, "Ablations (HyperFusion Table 1)"),
                (RunLayout.blend_weights, "Blend weights per fold"))


def config(c: dict) -> dict:
    return {"name": c["name"]}


def score_table(oof_scores: pd.DataFrame, stack_preds: pd.DataFrame, labels: np.ndarray,
                held: np.ndarray) -> pd.DataFrame:
    """``member, oof_src, oof_mae, heldback_src, heldback_mae, seconds``: the stack's out-of-fold scores next to
    each member's (and the blend's, column ``prediction``) scores on the held-back rows (NaN when there are none).

    ``stack_preds``: ``stack/predictions.parquet`` in posts order; ``labels`` (n,); ``held`` (n,) bool."""
    from popstack.stacking.metrics import scores

    rows = []
    for r in oof_scores.itertuples(index=False):
        col = "prediction" if r.member == "blend" else r.member
        hb = scores(labels[held], stack_preds[col].to_numpy()[held]) if held.any() else {"src": np.nan, "mae": np.nan}
        rows.append({"member": r.member, "oof_src": r.src, "oof_mae": r.mae, "heldback_src": hb["src"],
                     "heldback_mae": hb["mae"], "seconds": r.seconds})
    return pd.DataFrame(rows)


def headline(scores: pd.DataFrame) -> dict:
    """``{"src", "mae", "source"}``: the blend's held-back score (``source`` "held-back slice"), or its out-of-fold
    score (``source`` "out-of-fold") when the run has no held-back slice."""
    blend = scores[scores.member == "blend"].iloc[0] if (scores.member == "blend").any() else scores.iloc[0]
    if np.isfinite(blend.heldback_mae):
        return {"src": float(blend.heldback_src), "mae": float(blend.heldback_mae), "source": "held-back slice"}
    return {"src": float(blend.oof_src), "mae": float(blend.oof_mae), "source": "out-of-fold"}


def blend_warning(scores: pd.DataFrame, blend_members: list[str] | None = None) -> str | None:
    """A loud sentence when the blend's held-back MAE is worse than its best single member's, else None."""
    members = scores[(scores.member != "blend") & np.isfinite(scores.heldback_mae)]
    blend = scores[scores.member == "blend"]
    if members.empty or blend.empty or not np.isfinite(blend.heldback_mae.iloc[0]):
        return None
    best = members.loc[members.heldback_mae.idxmin()]
    if blend.heldback_mae.iloc[0] <= best.heldback_mae:
        return None
    return (f"WARNING: the blend is worse on the held-back slice than its best single member: blend MAE "
            f"{blend.heldback_mae.iloc[0]:.4f} vs {best.member} {best.heldback_mae:.4f} (SRC "
            f"{blend.heldback_src.iloc[0]:.4f} vs {best.heldback_src:.4f}). The blend weights were fitted on the "
            f"validation folds; the later posts do not behave like them.")


def constant_baseline(labels: np.ndarray, folds: pd.DataFrame) -> float:
    """MAE on the held-back slice of the constant that predicts the median of the labels the stack fitted (posts with
    a fold): what a submission is worth without any model; NaN without a held-back slice."""
    held = folds[HOLDOUT].to_numpy()
    fitted = (folds.fold != NO_FOLD).to_numpy() & ~held & np.isfinite(labels)
    if not held.any() or not fitted.any():
        return float("nan")
    return float(np.mean(np.abs(labels[held] - np.median(labels[fitted]))))


def baseline_warning(scores: pd.DataFrame, constant_mae: float) -> str | None:
    """A loud sentence when the blend is no better on the held-back slice than a constant prediction (its MAE not
    below the constant's), else None: validation says the submission is broken."""
    blend = scores[scores.member == "blend"]
    if blend.empty or not (np.isfinite(constant_mae) and np.isfinite(blend.heldback_mae.iloc[0])):
        return None
    if blend.heldback_mae.iloc[0] < constant_mae:
        return None
    return (f"WARNING: the blend is no better on the held-back slice than a constant prediction (the median of the "
            f"fitted labels): blend MAE {blend.heldback_mae.iloc[0]:.4f} vs constant {constant_mae:.4f}. Do not use "
            f"this submission as it is: the later posts do not behave like the ones fitted (check the members' "
            f"held-back scores, folds.strategy and the features).")


def guard_text(layout: RunLayout) -> str | None:
    """Markdown: the members left out of the blend and why, and the refit of the test predictions (None: neither)."""
    from popstack.pipeline import render

    parts = []
    if layout.dropped_members.is_file():
        dropped = pd.read_csv(layout.dropped_members)
        if len(dropped):
            parts.append("Left out of the blend (decided on validation rows and test-row predictions, never on the "
                         "held-back labels):\n\n" + render.markdown_table(dropped))
    if layout.refit.is_file():
        refit = pd.read_csv(layout.refit)
        if len(refit):
            parts.append("Test predictions come from a refit of these members on every labelled post (the held-back "
                         "slice included), with their best round counts scaled to the larger data and the folds' "
                         "blend weights; every score above is from before the refit.\n\n"
                         + render.markdown_table(refit))
    return "\n\n".join(parts) or None


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


def run(ctx: StageContext) -> StageResult:
    """Score table, ``predictions.parquet``, ``submission.json``, plots and ``report.md`` (and the same to W&B).

    Rendering (matplotlib) is imported here, not at module level: ``predict.py`` imports the stage modules' helpers
    and never draws."""
    from popstack.pipeline import render

    cfg, layout = ctx.cfg, ctx.layout
    posts, folds, stack_preds = _read_inputs(layout)
    held = folds[HOLDOUT].to_numpy()
    scores = score_table(pd.read_csv(layout.stack_scores), stack_preds, posts[LABEL].to_numpy(), held)
    fold_text = folds_line(cfg, folds, posts.postdate.to_numpy())
    log.info("report: %s", fold_text.replace("**", ""))
    preds = _write_predictions(layout, posts, stack_preds)
    test = _write_submission(cfg, layout, preds)
    labelled = preds[preds[KEY].isin(folds.loc[folds.fold != NO_FOLD, KEY])]
    head = headline(scores)
    head_text = (f"**SRC {head['src']:.4f} / MAE {head['mae']:.4f}** on the {head['source']}"
                 + (" (posts later than every post fitted, scored like the test split)."
                    if head["source"] == "held-back slice" else
                    ": no held-back slice (folds.holdout_fraction=0), so this is the optimistic out-of-fold figure."))
    constant_mae = constant_baseline(posts[LABEL].to_numpy(dtype=float), folds)
    if np.isfinite(constant_mae):
        head_text += f" A constant prediction (the median of the fitted labels) scores MAE {constant_mae:.4f} there."
    warning = "\n".join(w for w in (baseline_warning(scores, constant_mae), blend_warning(scores)) if w) or None
    for line in (warning or "").splitlines():
        log.warning("report: %s", line)
        head_text += f"\n\n**{line}**"
    sections = [("Headline", head_text),
                ("Scores: out-of-fold and held-back slice", fold_text + "\n\n" + render.markdown_table(scores))]
    guards = guard_text(layout)
    if guards:
        sections.append(("Members left out and the refit", guards))
    plots = _plot_sections(layout, labelled, sections)
    for rel, title in STACK_TABLES:
        path = layout.root / rel
        if path.is_file():
            sections.append((title, render.markdown_table(pd.read_csv(path))))
    stage_seconds = {name: m.seconds for name, m in ctx.manifests.items()}
    sections.append(("Time per stage", render.markdown_table(pd.DataFrame(
        {"stage": list(stage_seconds), "seconds": list(stage_seconds.values())}), ".1f")))
    counts = ctx.manifests["prepare"].counts if "prepare" in ctx.manifests else {}
    if counts:
        sections.append(("Data", render.markdown_table(pd.DataFrame({"count": list(counts),
                                                                      "value": list(counts.values())}))))
    render.write_report(layout.report, sections)
    if ctx.tracker is not None:
        _track(ctx.tracker, cfg, layout, scores, len(test), plots)
    render.print_summary(scores, stage_seconds, head, warning)
    log.info("report: %s", layout.report)
    blend_row = scores[scores.member == "blend"]
    metrics = {} if blend_row.empty else {
        "src": float(blend_row.oof_src.iloc[0]), "mae": float(blend_row.oof_mae.iloc[0]),
        "heldback_src": float(blend_row.heldback_src.iloc[0]), "heldback_mae": float(blend_row.heldback_mae.iloc[0]),
        "headline_src": head["src"], "headline_mae": head["mae"], "constant_heldback_mae": constant_mae}
    outputs = [RunLayout.predictions, RunLayout.submission, RunLayout.report, *(layout.rel(p) for p in plots)]
    return StageResult(outputs=outputs, counts={"test_predictions": len(test), "labelled": len(labelled),
                                                "heldback": int(held.sum())},
                       metrics=metrics)


def _read_inputs(layout: RunLayout) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Posts (``post_id, label, postdate, split, row``), folds and the stack's predictions, all in posts order;
    a post without a prediction is an error."""
    posts = pd.read_parquet(layout.posts, columns=[KEY, LABEL, "postdate", "split", "row"])
    folds = read_folds(layout.folds)
    if folds[KEY].tolist() != posts[KEY].tolist():
        raise RuntimeError(f"{layout.folds}: rows do not match {layout.posts}")
    stack_preds = pd.read_parquet(layout.stack_predictions).set_index(KEY).reindex(posts[KEY]).reset_index()
    missing = stack_preds.prediction.isna()
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} posts have no prediction, e.g. "
                           f"{stack_preds.loc[missing, KEY].head(3).tolist()}")
    return posts, folds, stack_preds


def _write_predictions(layout: RunLayout, posts: pd.DataFrame, stack_preds: pd.DataFrame) -> pd.DataFrame:
    """``predictions.parquet``: ``post_id, split, prediction, label`` of every post; returns it with ``row``."""
    preds = posts[[KEY, "split", "row"]].assign(prediction=stack_preds.prediction.to_numpy(),
                                                label=posts[LABEL].to_numpy())
    with atomic_path(layout.predictions) as tmp:
        preds[[KEY, "split", "prediction", "label"]].to_parquet(tmp, index=False)
    return preds


def _write_submission(cfg: DictConfig, layout: RunLayout, preds: pd.DataFrame) -> pd.DataFrame:
    """``submission.json`` of the test posts in test-file order; returns those rows."""
    test = preds[preds.split == "test"].sort_values("row")
    write_submission(
        test[KEY].tolist(), test.prediction.to_numpy(), layout.submission,
        details=f"popstack {cfg.name}: backbone {cfg.backbone.name} ({cfg.backbone.pretrained or 'random init'})",
    )
    return test


def _plot_sections(layout: RunLayout, labelled: pd.DataFrame, sections: list[tuple[str, str]]) -> list[Path]:
    """The prediction-distribution plot and, when the stack recorded importances, the top-20 feature plot and
    table, appended to ``sections``; returns the plot files."""
    from popstack.pipeline import render

    dist_png = render.plot_prediction_distribution(
        labelled[LABEL].to_numpy(), labelled.prediction.to_numpy(), layout.distribution_plot,
        "Out-of-fold blend vs ground truth",
    )
    sections.append(("Predicted vs true distribution", f"![distribution]({dist_png.name})"))
    plots = [dist_png]
    if layout.importance.is_file():
        importance = pd.read_csv(layout.importance).set_index("feature")["importance"]
        imp_png = render.plot_feature_importance(importance, layout.importance_plot)
        plots.append(imp_png)
        top = (importance / importance.sum() * 100).sort_values(ascending=False).head(20)
        table = pd.DataFrame({"rank": range(1, len(top) + 1), "feature": top.index, "importance_%": top.to_numpy()})
        sections.append(("Top-20 features", f"![importance]({imp_png.name})\n\n" + render.markdown_table(table, ".2f")))
    return plots


def _track(tracker, cfg: DictConfig, layout: RunLayout, scores: pd.DataFrame, n_test: int, plots: list[Path]) -> None:
    """The report's figures to W&B: summary scores, tables and plots (the driver logs the artifacts)."""
    blend = scores[scores.member == "blend"].iloc[0] if (scores.member == "blend").any() else scores.iloc[0]
    head = headline(scores)
    tracker.summary({"headline/src": head["src"], "headline/mae": head["mae"], "headline/source": head["source"],
                     "oof/src": float(blend.oof_src), "oof/mae": float(blend.oof_mae),
                     "heldback/src": float(blend.heldback_src), "heldback/mae": float(blend.heldback_mae),
                     "folds/strategy": str(cfg.folds.strategy), "test_posts": n_test})
    tracker.table("scores", scores)
    for path in (layout.ablation, layout.pseudo_rounds):
        if path.is_file():
            tracker.table(path.stem, pd.read_csv(path))
    for png in plots:
        tracker.image(f"plots/{png.stem}", png)
