"""The K-fold stack: members per fold, out-of-fold bookkeeping, per-fold blend, pseudo-labelling rounds.

    result = run_stack(X, y, folds, categorical, StackConfig())
    result.save(out_dir); predict_stack(out_dir, X_new)

For each round r = 0..R and fold k: every member is fitted on fold k's training part (kept rows + the
pseudo-labelled posts of earlier rounds) with early stopping on fold k's validation part, and predicts the
validation part (its out-of-fold predictions: each labelled row gets exactly one, from the model of the fold
that held it out) and every unlabelled row. Blend weights are fitted per fold on that fold's validation
predictions (eq. 8); a test post's prediction is the mean over folds of the fold blends (eq. 9).

Pseudo-labels are per fold (``fold_pseudo_labels``): fold k's training part gets unlabelled posts labelled by the
mean of fold k's own members (fitted without fold k's labelled rows; a neural member by its fold-k model's
predictions, not the fold mean), selected by their agreement. A label-mean over all folds, the fold mean of a neural
model, or fold k's blend (its weights are fitted on fold k's rows) would carry fold k's labels back into fold k and
lift its out-of-fold score.

Guards (``stacking.guard``): a neural member's predictions are clipped to the training label range widened by
``label_margin`` of its width; a member whose unlabelled-row predictions leave that range (more than ``max_outside``
of them, before clipping) or whose error on the latest validation rows (``latest``: the last share of the rows with
a fold, by date; the held-back slice never decides) is more than ``max_error_ratio`` times both its error on the
other validation rows and the best member's error on the latest rows, is left out of the blend; ``dropped`` names
it and says why. At least one member always stays.

Refit (``stacking.refit_full``, AutoGluon's ``refit_full``): after validation every tree member is fitted once more
on every labelled row, the held-back slice included, with its mean best round count over the folds scaled by the
larger row count and the folds' learning rate, no early stopping; the unlabelled rows that are not held back (the
test posts) are predicted by those refits, blended with the fold blends' mean weights. TabNet and the neural
members keep their fold models (their test predictions are the fold means). Validation scores, out-of-fold and
held-back, all come from the fold models, before the refit.

Loss-based selection (CMPA-DGPL §4.2) ranks the labelled rows by a per-row loss given by the caller (the
prompt/prototype module's out-of-fold classification loss); without one it falls back to the absolute error of an
out-of-fold ``selection_member`` pass, and says so in the log.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from popstack.datamodules.folds import train_valid_masks
from popstack.datamodules.schema import NO_FOLD
from popstack.stacking.blend import blend, fit_weights
from popstack.stacking.config import StackConfig
from popstack.stacking.members import (
    NeuralMember,
    available_cores,
    fit_cores,
    fit_threads,
    label_bounds,
    load_member,
    make_member,
    member_class,
    refit_params,
)
from popstack.stacking.metrics import scores
from popstack.stacking.pseudo import select_pseudo
from popstack.stacking.selection import iqr_filter, loss_based_keep

log = logging.getLogger("popstack")


@dataclass
class StackResult:
    """All numbers a report needs, plus the fitted models of the final round (per member, per fold)."""

    member_names: list[str]
    oof: pd.DataFrame  # labelled rows: member columns + "blend"
    test: pd.DataFrame  # unlabelled rows: member columns + "blend" (fold means)
    scores: pd.DataFrame  # member, src, mae, seconds
    weights: pd.DataFrame  # fold, member, weight (+ intercept rows for ridge)
    rounds: pd.DataFrame  # round, pseudo_selected, tau, src, mae
    importance: pd.Series
    models: dict[tuple[str, int], Any]
    blend_params: dict[int, dict]
    feature_columns: list[str]
    config: StackConfig
    blend_members: list[str] = field(default_factory=list)  # the members the blend uses (the guards' survivors)
    dropped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["member", "reason"]))
    refit: dict[str, Any] = field(default_factory=dict)  # member -> model fitted on every label
    refit_rounds: dict[str, int] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        (directory / "members").mkdir(parents=True, exist_ok=True)
        kinds = {}
        for (name, k), model in self.models.items():
            kind = "neural" if isinstance(model, NeuralMember) else name
            kinds[name] = kind
            model.save(directory / "members" / f"{name}.fold{k}.{model.extension}")
        for name, model in self.refit.items():
            model.save(directory / "members" / f"{name}.full.{model.extension}")
        manifest = {
            "members": self.member_names, "kinds": kinds, "folds": sorted({k for _, k in self.models}),
            "blend_members": self.blend_members or self.member_names,
            "blend": {str(k): {"weights": np.asarray(v["weights"]).tolist(), "intercept": v["intercept"]}
                      for k, v in self.blend_params.items()},
            "refit": sorted(self.refit),
            "feature_columns": self.feature_columns, "config": asdict(self.config),
            "extensions": {name: m.extension for (name, _), m in self.models.items()},
        }
        (directory / "stack.json").write_text(json.dumps(manifest, indent=1))


def _member_list(cfg: StackConfig) -> list[str]:
    return list(cfg.fitted_members()) + list(cfg.neural_columns)


def _new_member(name: str, cfg: StackConfig, categorical: list[str]):
    if name in cfg.neural_columns:
        return NeuralMember(name, float(cfg.guard.label_margin))
    return make_member(name, cfg.params(name), categorical, cfg.seed)


def _first_pass_losses(X: pd.DataFrame, y: np.ndarray, folds: np.ndarray, categorical, cfg: StackConfig) -> np.ndarray:
    """Per-row absolute error of an out-of-fold first pass with ``cfg.selection_member``."""
    oof = np.full(len(y), np.nan)
    for k in np.unique(folds):
        tr, va = folds != k, folds == k
        m = make_member(cfg.selection_member, cfg.params(cfg.selection_member), categorical, cfg.seed)
        m.fit(X[tr], y[tr], X[va], y[va])
        oof[va] = m.predict(X[va])
    return np.abs(oof - y)


def _fit_one(name: str, cfg: StackConfig, categorical: list[str], X_tr: pd.DataFrame, y_tr: np.ndarray,
             X_va: pd.DataFrame, y_va: np.ndarray, X_un: pd.DataFrame) -> tuple[Any, np.ndarray, np.ndarray, float]:
    """One (fold, member) fit: the fitted member, its validation and unlabelled-row predictions, and seconds."""
    start = time.perf_counter()
    cols = [name] if name in cfg.neural_columns else [c for c in X_tr.columns if c not in cfg.neural_columns]
    member = _new_member(name, cfg, categorical).fit(X_tr[cols], y_tr, X_va[cols], y_va)
    va_pred = member.predict(X_va[cols])
    un_pred = member.predict(X_un[cols]) if len(X_un) else np.zeros(0)
    return member, va_pred, un_pred, time.perf_counter() - start


def concurrent_fits(n_jobs: int | str, n_tasks: int, threads_per_fit: int) -> int:
    """How many (fold, member) fits run at once. ``auto``: as many as the cores allow at ``threads_per_fit``
    threads each (``members.fit_threads``: one per 20k training rows unless a member sets its own), so small folds
    fill every core with one-thread fits and a large fit keeps every core to itself; an integer is taken as it is
    (1 = one at a time)."""
    if str(n_jobs).lower() == "auto":
        jobs = available_cores() // max(threads_per_fit, 1)
    else:
        jobs = int(n_jobs)
    if jobs < 1 and str(n_jobs).lower() != "auto":
        raise ValueError(f"stacking.n_jobs must be auto or >= 1, got {n_jobs!r}")
    return max(1, min(jobs, n_tasks))


@contextlib.contextmanager
def torch_threads(n: int):
    """PyTorch's (process-wide) intra-op threads set to ``n`` within the block (TabNet fits on threads share it;
    the stack uses it only when TabNet is a member)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _selection_keep(XL: pd.DataFrame, yl: np.ndarray, fl: np.ndarray, categorical: list[str], cfg: StackConfig,
                    losses: np.ndarray | None) -> np.ndarray:
    """Keep-mask of loss-based selection over the labelled rows (NaN losses: no loss known, always kept)."""
    if losses is None:
        log.warning("stack: loss-based selection has no per-post classification loss (the prompt/prototype module "
                    "is off); ranking by the absolute error of an out-of-fold %s pass instead", cfg.selection_member)
        losses = _first_pass_losses(XL, yl, fl, categorical, cfg)
    else:
        log.info("stack: loss-based selection ranks rows by the prompt/prototype module's out-of-fold "
                 "classification loss")
    keep = np.ones(len(yl), dtype=bool)
    known = ~np.isnan(losses)
    keep[known] = loss_based_keep(losses[known], cfg.selection_fraction)
    return keep


def run_stack(
    X: pd.DataFrame, y: np.ndarray, folds: np.ndarray, categorical: list[str], cfg: StackConfig,
    eval_folds: list[int] | None = None, progress: bool = False, selection_losses: np.ndarray | None = None,
    latest: np.ndarray | None = None,
    neural_unlabelled_by_fold: dict[str, dict[int, np.ndarray]] | None = None,
) -> StackResult:
    """Fit the stack. ``X``: float32 features of every post (neural prediction columns included);
    ``y``: labels (ignored where the fold is NO_FOLD: unlabelled and held-back posts); ``folds``: from
    ``datamodules.folds``. ``eval_folds``: fit only these folds (e.g. ``[0]``: one hold-out split instead of
    K-fold); scores are then computed on those folds' rows only. ``progress`` shows a bar over (round, fold,
    member) fits. ``selection_losses``: (n,) per-row loss for loss-based selection (NaN = unknown), or None.
    ``latest``: (n,) bool, the latest rows with a fold (by date), on which the error guard decides; None = no error
    guard. A row without a fold but with a label (the held-back slice) reaches only the refit (``cfg.refit_full``).
    ``neural_unlabelled_by_fold``: {neural column: {fold k: predictions of fold k's neural model for the
    unlabelled rows, in their order}}; pseudo-labelling reads a neural member's fold-k model from it
    (``fold_pseudo_labels``), never the fold mean in ``X``."""
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    labelled = folds != NO_FOLD
    if np.isnan(y[labelled]).any():
        raise ValueError("a row with a fold has no label")
    held_labels = np.where(labelled, np.nan, y)[~labelled]  # the held-back slice's labels: the refit's only
    y = np.where(labelled, y, np.nan)  # a held-back row's label never reaches a validated fit
    names = _member_list(cfg)
    if not names:
        raise ValueError("the stack has no members")
    feature_columns = [c for c in X.columns if c not in cfg.neural_columns]
    XL, yl, fl = X[labelled].reset_index(drop=True), y[labelled], folds[labelled]
    XU = X[~labelled].reset_index(drop=True)
    fold_ids = sorted(np.unique(fl).tolist()) if eval_folds is None else list(eval_folds)
    scored = np.isin(fl, fold_ids)
    latest_l = None if latest is None else np.asarray(latest, dtype=bool)[labelled] & scored
    keep = _rows_to_fit(XL, yl, fl, categorical, cfg, feature_columns,
                        None if selection_losses is None else np.asarray(selection_losses)[labelled])
    log.info("stack: %d labelled rows, %d kept for fitting (IQR k=%s, selection %.2f), %d unlabelled",
             len(yl), int(keep.sum()), cfg.iqr_k, cfg.selection_fraction, len(XU))

    n_fit_rows = int(keep.sum())
    threads = max([fit_threads(n, p, n_fit_rows, available_cores()) for n, p in cfg.fitted_members().items()],
                  default=1)
    jobs = concurrent_fits(cfg.n_jobs, len(fold_ids) * len(names), threads)
    log.info("stack: %d fits at a time, %d core(s) each", jobs, max(available_cores() // jobs, 1))

    from popstack.datamodules.progress import progress as progress_bar

    bar = progress_bar(total=(cfg.pseudo_rounds + 1) * len(fold_ids) * len(names), desc="stack", unit="fit",
                       enabled=progress)
    pseudo = {k: (XU.iloc[:0], np.zeros(0)) for k in fold_ids}  # per fold: rows and their pseudo-labels
    round_log = []
    for r in range(cfg.pseudo_rounds + 1):
        fits = _fit_members(names, cfg, categorical, XL, yl, fl, XU, fold_ids, keep, pseudo, jobs,
                            bar)
        dropped = guard_members(names, cfg, fits, yl, keep, XU, scored, latest_l)
        active = [n for n in names if n not in dropped]
        blended = _blend_folds(active, cfg, fits, yl, fl, fold_ids, has_unlabelled=len(XU) > 0)
        sc = scores(yl[scored], blended.oof[scored])
        entry = {"round": r, "pseudo_rows": int(np.mean([len(pseudo[k][1]) for k in fold_ids])), **sc,
                 "tau": np.nan, "selected_next": 0, "member_seconds": round(sum(fits.seconds.values()), 3)}
        if r < cfg.pseudo_rounds and len(XU):
            taus = []
            for k in fold_ids:  # fold k's pseudo-labels from models that never saw fold k's labels
                mask, labels, tau = fold_pseudo_labels(active, cfg, fits.test_by_fold, k,
                                                       neural_unlabelled_by_fold)
                pseudo[k] = (XU[mask], labels)
                taus.append(tau)
            entry.update(tau=float(np.mean(taus)),
                         selected_next=int(np.mean([len(pseudo[k][1]) for k in fold_ids])))
        round_log.append(entry)
        log.info("stack round %d: OOF SRC %.4f MAE %.4f (pseudo rows per fold in training: %d)", r, sc["src"],
                 sc["mae"], entry["pseudo_rows"])
    bar.close()
    for n, why in dropped.items():
        log.warning("stack: member %s left out of the blend: %s", n, why)
    result = _result(names, cfg, fits, blended, yl, scored, round_log, feature_columns)
    result.blend_members = active
    result.dropped = pd.DataFrame({"member": list(dropped), "reason": list(dropped.values())},
                                  columns=["member", "reason"])
    if cfg.refit_full and len(XU) and eval_folds is None:
        _refit_full(result, cfg, categorical, XL, yl, fl, keep, XU, held_labels, fold_ids)
    return result


def guard_members(names: list[str], cfg: StackConfig, fits: "_RoundFits", yl: np.ndarray, keep: np.ndarray,
                  XU: pd.DataFrame, scored: np.ndarray, latest: np.ndarray | None) -> dict[str, str]:
    """``{member: reason}`` for the members the blend leaves out (see the module docstring); never all of them."""
    g = cfg.guard
    lo, hi = label_bounds(yl[keep], float(g.label_margin))
    reasons: dict[str, str] = {}
    for n in names:
        test = XU[n].to_numpy(dtype=np.float64) if n in cfg.neural_columns else (
            np.mean([fits.test_by_fold[n][k] for k in fits.test_by_fold[n]], axis=0) if len(XU) else np.zeros(0))
        outside = float(np.mean((test < lo) | (test > hi))) if len(test) else 0.0
        if outside > float(g.max_outside):
            reasons[n] = (f"{outside:.1%} of its test predictions lie outside the training label range with margin "
                          f"[{lo:.3g}, {hi:.3g}] (allowed {float(g.max_outside):.1%})")
    if latest is not None and latest.any() and (scored & ~latest).any():
        err = {n: (float(np.mean(np.abs(fits.oof[n][latest] - yl[latest]))),
                   float(np.mean(np.abs(fits.oof[n][scored & ~latest] - yl[scored & ~latest])))) for n in names}
        best_latest = min(e[0] for e in err.values())
        ratio = float(g.max_error_ratio)
        for n, (late, rest) in err.items():
            if n not in reasons and late > ratio * rest and late > ratio * best_latest:
                reasons[n] = (f"MAE {late:.3g} on the latest validation rows is more than {ratio:g}x its MAE "
                              f"{rest:.3g} on the earlier ones and the best member's {best_latest:.3g} there")
    if len(reasons) == len(names):  # keep the member with the lowest out-of-fold error
        best = min(names, key=lambda n: float(np.mean(np.abs(fits.oof[n][scored] - yl[scored]))))
        reasons.pop(best)
    return reasons


def _mean_params(params: dict[int, dict]) -> dict:
    """The fold blends' mean weights and intercept (the blend is linear: the mean of the fold blends' predictions
    equals the blend with the mean parameters)."""
    return {"weights": np.mean([np.asarray(p["weights"], float) for p in params.values()], axis=0),
            "intercept": float(np.mean([p["intercept"] for p in params.values()]))}


def _refit_full(result: StackResult, cfg: StackConfig, categorical: list[str], XL: pd.DataFrame, yl: np.ndarray,
                fl: np.ndarray, keep: np.ndarray, XU: pd.DataFrame, held_labels: np.ndarray,
                fold_ids: list[int]) -> None:
    """Refit the blend's tree members on every label (the held-back slice included) and replace the test rows'
    predictions (the unlabelled rows that are not held back) in ``result.test``; see the module docstring."""
    held = ~np.isnan(held_labels)
    X_full = pd.concat([XL[keep], XU[held]], ignore_index=True)
    y_full = np.concatenate([yl[keep], held_labels[held]])
    fold_rows = float(np.mean([int((keep & (fl != k)).sum()) for k in fold_ids]))
    test_rows = ~held
    preds = {}
    for n in result.blend_members:
        if n in cfg.neural_columns or member_class(n).round_key is None:  # neural, TabNet: their fold models' mean
            preds[n] = result.test[n].to_numpy()[test_rows]
            continue
        best = float(np.mean([result.models[(n, k)].best_rounds() for k in fold_ids]))
        rounds = max(1, int(round(best * len(y_full) / fold_rows)))
        cols = [c for c in X_full.columns if c not in cfg.neural_columns]
        member = make_member(n, refit_params(n, cfg.params(n), rounds, int(fold_rows)), categorical, cfg.seed)
        member.fit(X_full[cols], y_full, None, None)
        result.refit[n], result.refit_rounds[n] = member, rounds
        preds[n] = member.predict(XU[cols][test_rows])
        result.test.loc[test_rows, n] = preds[n]
    P = np.column_stack([preds[n] for n in result.blend_members])
    result.test.loc[test_rows, "blend"] = blend(P, _mean_params(result.blend_params))
    log.info("stack: refit on %d labels (%d held back) for %d test rows: %s", len(y_full), int(held.sum()),
             int(test_rows.sum()), ", ".join(f"{n} {r} rounds" for n, r in result.refit_rounds.items()))


def fold_pseudo_labels(names: list[str], cfg: StackConfig, test_by_fold: dict[str, dict[int, np.ndarray]],
                       k: int, neural_unlabelled_by_fold: dict[str, dict[int, np.ndarray]] | None,
                       ) -> tuple[np.ndarray, np.ndarray, float]:
    """Fold ``k``'s pseudo-labels (eq. 10) from models that never saw fold k's labels: the selection mask over the
    unlabelled rows, the labels of the selected rows, and tau.

    The ensemble is fold k's tree members (fitted on the other folds) and, for each neural member, the fold-k neural
    model's own predictions (``neural_unlabelled_by_fold[column][k]``; the column in the stack inputs holds the mean
    over all fold models, four of which trained on fold k's labels). Confidence is the members' agreement; the label
    is their plain mean: fold k's blend weights are fitted on fold k's labels, so the blend would carry them back
    into fold k. A neural member without per-fold predictions is left out of pseudo-labelling (logged)."""
    per_fold = neural_unlabelled_by_fold or {}
    columns = []
    for n in names:
        if n not in cfg.neural_columns:
            columns.append(test_by_fold[n][k])
        elif n in per_fold and k in per_fold[n]:
            columns.append(np.asarray(per_fold[n][k], dtype=np.float64))
        else:
            log.warning("stack: pseudo-labels of fold %d leave out neural member %s (no per-fold predictions of "
                        "the unlabelled posts)", k, n)
    if not columns:
        raise ValueError("pseudo-labelling has no member that never saw the fold's labels (neural members need "
                         "per-fold predictions of the unlabelled posts)")
    P = np.column_stack(columns)
    mask, tau = select_pseudo(P, cfg.pseudo_alpha)
    return mask, P[mask].mean(axis=1), tau


def _rows_to_fit(XL: pd.DataFrame, yl: np.ndarray, fl: np.ndarray, categorical: list[str], cfg: StackConfig,
                 feature_columns: list[str], losses: np.ndarray | None) -> np.ndarray:
    """Boolean (labelled rows,): the rows the members fit on after the IQR filter and loss-based selection
    (``losses``: per labelled row, NaN = unknown, or None)."""
    keep = np.ones(len(yl), dtype=bool)
    if cfg.iqr_k > 0:
        keep &= iqr_filter(yl, cfg.iqr_k)
    if cfg.selection_fraction < 1.0:
        losses = None if losses is None else losses.astype(np.float64)
        keep &= _selection_keep(XL[feature_columns], yl, fl, categorical, cfg, losses)
    return keep


@dataclass
class _RoundFits:
    """One round's member fits: out-of-fold predictions per member, each fold's predictions for the unlabelled
    rows, seconds per member, and the fitted models by (member, fold)."""

    oof: dict[str, np.ndarray]
    test_by_fold: dict[str, dict[int, np.ndarray]]
    seconds: dict[str, float]
    models: dict[tuple[str, int], Any]


def _fit_members(names: list[str], cfg: StackConfig, categorical: list[str], XL: pd.DataFrame, yl: np.ndarray,
                 fl: np.ndarray, XU: pd.DataFrame, fold_ids: list[int], keep: np.ndarray,
                 pseudo: dict[int, tuple[pd.DataFrame, np.ndarray]], jobs: int, bar) -> _RoundFits:
    """Every member on every fold: trained on the fold's kept training rows plus its pseudo-labelled rows.

    ``jobs`` (member, fold) fits run at once on threads: the libraries fit outside the GIL, the threads read the one
    source matrix, the members of one fold share its training frame (fold rows + pseudo-labels, built once per
    fold), and each fit gets ``available_cores() // jobs`` cores. Results are the same whatever order the fits
    finish in."""
    from concurrent.futures import ThreadPoolExecutor

    def training_part(k: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """Fold ``k``'s training frame (kept rows + its pseudo-labelled rows), their labels, its validation mask."""
        tr, va = train_valid_masks(fl, k)
        tr &= keep
        return pd.concat([XL[tr], pseudo[k][0]], ignore_index=True), np.concatenate([yl[tr], pseudo[k][1]]), va

    def fit(n: str, X_tr: pd.DataFrame, y_tr: np.ndarray, va: np.ndarray):
        result = _fit_one(n, cfg, categorical, X_tr, y_tr, XL[va], yl[va], XU)
        bar.update()
        return result

    order = [(n, k) for k in fold_ids for n in names]
    if jobs == 1:
        results = {}
        for k in fold_ids:
            part = training_part(k)
            results.update({(n, k): fit(n, *part) for n in names})
    else:
        cores = max(available_cores() // jobs, 1)
        uses_torch = any(member_class(n).uses_torch for n in cfg.fitted_members())
        threads = torch_threads(cores) if uses_torch else contextlib.nullcontext()
        with fit_cores(cores), threads, ThreadPoolExecutor(jobs, thread_name_prefix="stack-fit") as pool:
            futures = {}
            for i, k in enumerate(fold_ids):
                if i >= jobs:  # at most jobs + 1 folds' training frames alive at once
                    for n in names:
                        futures[(n, fold_ids[i - jobs])].result()
                part = training_part(k)
                for n in names:
                    futures[(n, k)] = pool.submit(contextvars.copy_context().run, fit, n, *part)
            results = {key: f.result() for key, f in futures.items()}
    fits = _RoundFits({n: np.full(len(yl), np.nan) for n in names}, {n: {} for n in names},
                      dict.fromkeys(names, 0.0), {})
    for (n, k) in order:
        member, va_pred, un_pred, sec = results[(n, k)]
        fits.oof[n][fl == k], fits.test_by_fold[n][k] = va_pred, un_pred
        fits.seconds[n] += sec
        fits.models[(n, k)] = member
    return fits


@dataclass
class _Blended:
    """Per-fold blend weights (fitted on the fold's validation rows), the out-of-fold blend, each fold's blend
    of the unlabelled rows, and their mean over folds (``test``; empty without unlabelled rows)."""

    params: dict[int, dict]
    oof: np.ndarray
    test_by_fold: dict[int, np.ndarray]
    test: np.ndarray
    members: list[str]


def _blend_folds(names: list[str], cfg: StackConfig, fits: _RoundFits, yl: np.ndarray, fl: np.ndarray,
                 fold_ids: list[int], has_unlabelled: bool) -> _Blended:
    params, oof_blend, test_blend = {}, np.full(len(yl), np.nan), {}
    for k in fold_ids:
        va = fl == k
        P = np.column_stack([fits.oof[n][va] for n in names])
        params[k] = fit_weights(P, yl[va], cfg.blend, cfg.caruana_size)
        oof_blend[va] = blend(P, params[k])
        if has_unlabelled:
            test_blend[k] = blend(np.column_stack([fits.test_by_fold[n][k] for n in names]), params[k])
    test = np.mean([test_blend[k] for k in fold_ids], axis=0) if has_unlabelled else np.zeros(0)
    return _Blended(params, oof_blend, test_blend, test, list(names))


def _result(names: list[str], cfg: StackConfig, fits: _RoundFits, blended: _Blended, yl: np.ndarray,
            scored: np.ndarray, round_log: list[dict], feature_columns: list[str]) -> StackResult:
    """The last round's fits as a ``StackResult``: scores, blend weights, mean normalised importances."""
    has_unlabelled = len(blended.test) > 0
    member_test = {n: np.mean([fits.test_by_fold[n][k] for k in blended.params], axis=0) if has_unlabelled
                   else np.zeros(0) for n in names}
    rows = [{"member": n, **scores(yl[scored], fits.oof[n][scored]), "seconds": round(fits.seconds[n], 2)}
            for n in names]
    rows.append({"member": "blend", **scores(yl[scored], blended.oof[scored]),
                 "seconds": round(sum(fits.seconds.values()), 2)})
    active = blended.members
    weights = pd.DataFrame([{"fold": k, "member": n, "weight": float(w)} for k, p in blended.params.items()
                            for n, w in zip(active, p["weights"])])
    importances = [m.feature_importance() for m in fits.models.values()]
    importances = [s / s.sum() for s in importances if s is not None and s.sum() > 0]
    importance = pd.concat(importances, axis=1).fillna(0).mean(axis=1) if importances else pd.Series(dtype=float)
    return StackResult(
        member_names=names,
        oof=pd.DataFrame({**fits.oof, "blend": blended.oof}),
        test=pd.DataFrame({**member_test, "blend": blended.test}),
        scores=pd.DataFrame(rows), weights=weights, rounds=pd.DataFrame(round_log), importance=importance,
        models=fits.models, blend_params=blended.params, feature_columns=feature_columns, config=cfg,
    )


def predict_stack(directory: str | Path, X: pd.DataFrame) -> np.ndarray:
    """Predictions for new rows: every fold's blend members -> the fold's blend -> mean over folds; with a refit
    (``refit_full``), the refitted tree members (and the fold means of the others) -> the mean fold blend."""
    return predict_stack_members(directory, X)["blend"].to_numpy()


def predict_stack_members(directory: str | Path, X: pd.DataFrame) -> pd.DataFrame:
    """Per-member predictions for new rows: one column per member of the blend (its refit on every label when
    ``refit_full`` made one, else the mean over its fold models, as the stack's test predictions are) and ``blend``
    (what ``predict_stack`` returns)."""
    directory = Path(directory)
    manifest = json.loads((directory / "stack.json").read_text())
    neural = set(manifest["config"]["neural_columns"])
    members = manifest["blend_members"]
    refit = manifest["refit"]

    def member_predict(name: str, tag: str) -> np.ndarray:
        member = load_member(manifest["kinds"][name],
                             directory / "members" / f"{name}.{tag}.{manifest['extensions'][name]}")
        return member.predict(X[[name] if name in neural else manifest["feature_columns"]])

    fold_preds = {k: {n: member_predict(n, f"fold{k}") for n in members if n not in refit} for k in manifest["folds"]}
    per_member = {n: member_predict(n, "full") if n in refit else
                  np.mean([fold_preds[k][n] for k in manifest["folds"]], axis=0) for n in members}
    if refit:
        out = blend(np.column_stack([per_member[n] for n in members]),
                    _mean_params({k: manifest["blend"][str(k)] for k in manifest["folds"]}))
    else:
        out = np.mean([blend(np.column_stack([fold_preds[k][n] for n in members]), manifest["blend"][str(k)])
                       for k in manifest["folds"]], axis=0)
    return pd.DataFrame({**per_member, "blend": out}, index=X.index)
