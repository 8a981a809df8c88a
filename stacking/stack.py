"""The K-fold stack: members per fold, out-of-fold bookkeeping, per-fold blend, pseudo-labelling rounds.

    result = run_stack(X, y, folds, categorical, StackConfig())
    result.save(out_dir); predict_stack(out_dir, X_new)

For each round r = 0..R and fold k: every member is fitted on fold k's training part (kept rows + the
pseudo-labelled posts of earlier rounds) with early stopping on fold k's validation part, and predicts the
validation part (its out-of-fold predictions: each labelled row gets exactly one, from the model of the fold
that held it out) and every unlabelled row. Blend weights are fitted per fold on that fold's validation
predictions (eq. 8); a test post's prediction is the mean over folds of the fold blends (eq. 9).

Pseudo-labels are per fold: fold k's training part gets unlabelled posts labelled by fold k's own blend (its members
were fitted without fold k's labelled rows), selected by the agreement of fold k's own members. A label-mean over
all folds would carry fold k's labels back into fold k through the models of the other folds, and lift its
out-of-fold score.

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

from datamodules.folds import train_valid_masks
from datamodules.schema import NO_FOLD
from stacking.blend import blend, fit_weights
from stacking.members import NeuralMember, available_cores, fit_cores, fit_threads, load_member, make_member
from stacking.metrics import scores
from stacking.pseudo import select_pseudo
from stacking.selection import iqr_filter, loss_based_keep

log = logging.getLogger("popstack")


#: The one source of the stack's defaults: the Hydra group ``stacking/`` (``StackConfig()`` reads it).
DEFAULTS_YAML = Path(__file__).resolve().parent.parent / "configs" / "stacking" / "default.yaml"


def yaml_default(key: str) -> Any:
    """``key`` of ``configs/stacking/default.yaml``; ``members`` = the enabled members' params (``enabled`` dropped)."""
    import yaml

    raw = yaml.safe_load(DEFAULTS_YAML.read_text())
    if key == "members":
        return {n: {k: v for k, v in p.items() if k != "enabled"}
                for n, p in raw[key].items() if p.get("enabled", True)}
    return raw[key]


def _from_yaml(key: str):
    return field(default_factory=lambda: yaml_default(key))


@dataclass
class StackConfig:
    """members: tree members to fit ({name: params}); neural_columns: prediction columns read as members.
    blend: caruana | mae | spearman | ridge; caruana_size: greedy steps.
    pseudo_rounds, pseudo_alpha: eq. 10. iqr_k: IQR fence factor for training labels (0 = no filter).
    selection_fraction: loss-based selection (1.0 = keep all; the paper uses 0.77).
    n_jobs: (fold, member) fits at once: auto (``concurrent_fits``) or an integer.
    Defaults come from ``configs/stacking/default.yaml`` (``DEFAULTS_YAML``), never from this class.
    """

    members: dict[str, dict[str, Any]] = _from_yaml("members")
    neural_columns: list[str] = field(default_factory=list)
    blend: str = _from_yaml("blend")
    caruana_size: int = _from_yaml("caruana_size")
    pseudo_rounds: int = _from_yaml("pseudo_rounds")
    pseudo_alpha: float = _from_yaml("pseudo_alpha")
    iqr_k: float = _from_yaml("iqr_k")
    selection_fraction: float = _from_yaml("selection_fraction")
    selection_member: str = _from_yaml("selection_member")
    n_jobs: int | str = _from_yaml("n_jobs")
    seed: int = 0


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

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        (directory / "members").mkdir(parents=True, exist_ok=True)
        kinds = {}
        for (name, k), model in self.models.items():
            kind = "neural" if isinstance(model, NeuralMember) else name
            kinds[name] = kind
            model.save(directory / "members" / f"{name}.fold{k}.{model.extension}")
        manifest = {
            "members": self.member_names, "kinds": kinds, "folds": sorted({k for _, k in self.models}),
            "blend": {str(k): {"weights": np.asarray(v["weights"]).tolist(), "intercept": v["intercept"]}
                      for k, v in self.blend_params.items()},
            "feature_columns": self.feature_columns, "config": asdict(self.config),
            "extensions": {name: m.extension for (name, _), m in self.models.items()},
        }
        (directory / "stack.json").write_text(json.dumps(manifest, indent=1))


def _member_list(cfg: StackConfig) -> list[str]:
    return list(cfg.members) + list(cfg.neural_columns)


def _new_member(name: str, cfg: StackConfig, categorical: list[str]):
    if name in cfg.neural_columns:
        return NeuralMember(name)
    return make_member(name, cfg.members[name], categorical, cfg.seed)


def _first_pass_losses(X: pd.DataFrame, y: np.ndarray, folds: np.ndarray, categorical, cfg: StackConfig) -> np.ndarray:
    """Per-row absolute error of an out-of-fold first pass with ``cfg.selection_member``."""
    oof = np.full(len(y), np.nan)
    for k in np.unique(folds):
        tr, va = folds != k, folds == k
        m = make_member(cfg.selection_member, cfg.members[cfg.selection_member], categorical, cfg.seed)
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
) -> StackResult:
    """Fit the stack. ``X``: float32 features of every post (neural prediction columns included);
    ``y``: labels (ignored where the fold is NO_FOLD: unlabelled and held-back posts); ``folds``: from
    ``datamodules.folds``. ``eval_folds``: fit only these folds (e.g. ``[0]``: one hold-out split instead of
    K-fold); scores are then computed on those folds' rows only. ``progress`` shows a bar over (round, fold,
    member) fits. ``selection_losses``: (n,) per-row loss for loss-based selection (NaN = unknown), or None."""
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    labelled = folds != NO_FOLD
    if np.isnan(y[labelled]).any():
        raise ValueError("a row with a fold has no label")
    y = np.where(labelled, y, np.nan)  # a held-back row's label never reaches a fit
    names = _member_list(cfg)
    if not names:
        raise ValueError("the stack has no members")
    feature_columns = [c for c in X.columns if c not in cfg.neural_columns]
    XL, yl, fl = X[labelled].reset_index(drop=True), y[labelled], folds[labelled]
    XU = X[~labelled].reset_index(drop=True)
    fold_ids = sorted(np.unique(fl).tolist()) if eval_folds is None else list(eval_folds)
    scored = np.isin(fl, fold_ids)
    keep = _rows_to_fit(XL, yl, fl, categorical, cfg, feature_columns,
                        None if selection_losses is None else np.asarray(selection_losses)[labelled])
    log.info("stack: %d labelled rows, %d kept for fitting (IQR k=%s, selection %.2f), %d unlabelled",
             len(yl), int(keep.sum()), cfg.iqr_k, cfg.selection_fraction, len(XU))

    n_fit_rows = int(keep.sum())
    threads = max([fit_threads(n, p, n_fit_rows, available_cores()) for n, p in cfg.members.items()], default=1)
    jobs = concurrent_fits(cfg.n_jobs, len(fold_ids) * len(names), threads)
    log.info("stack: %d fits at a time, %d core(s) each", jobs, max(available_cores() // jobs, 1))

    from datamodules.progress import progress as progress_bar

    bar = progress_bar(total=(cfg.pseudo_rounds + 1) * len(fold_ids) * len(names), desc="stack", unit="fit",
                       enabled=progress)
    pseudo = {k: (XU.iloc[:0], np.zeros(0)) for k in fold_ids}  # per fold: rows and their pseudo-labels
    round_log = []
    for r in range(cfg.pseudo_rounds + 1):
        fits = _fit_members(names, cfg, categorical, XL, yl, fl, XU, fold_ids, keep, pseudo, jobs,
                            bar)
        blended = _blend_folds(names, cfg, fits, yl, fl, fold_ids, has_unlabelled=len(XU) > 0)
        sc = scores(yl[scored], blended.oof[scored])
        entry = {"round": r, "pseudo_rows": int(np.mean([len(pseudo[k][1]) for k in fold_ids])), **sc,
                 "tau": np.nan, "selected_next": 0, "member_seconds": round(sum(fits.seconds.values()), 3)}
        if r < cfg.pseudo_rounds and len(XU):
            taus = []
            for k in fold_ids:  # fold k's pseudo-labels from fold k's own members only
                mask, tau = select_pseudo(np.column_stack([fits.test_by_fold[n][k] for n in names]),
                                          cfg.pseudo_alpha)
                pseudo[k] = (XU[mask], blended.test_by_fold[k][mask])
                taus.append(tau)
            entry.update(tau=float(np.mean(taus)),
                         selected_next=int(np.mean([len(pseudo[k][1]) for k in fold_ids])))
        round_log.append(entry)
        log.info("stack round %d: OOF SRC %.4f MAE %.4f (pseudo rows per fold in training: %d)", r, sc["src"],
                 sc["mae"], entry["pseudo_rows"])
    bar.close()
    return _result(names, cfg, fits, blended, yl, scored, round_log, feature_columns)


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
        threads = torch_threads(cores) if "tabnet" in cfg.members else contextlib.nullcontext()
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
    return _Blended(params, oof_blend, test_blend, test)


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
    weights = pd.DataFrame([{"fold": k, "member": n, "weight": float(w)} for k, p in blended.params.items()
                            for n, w in zip(names, p["weights"])])
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
    """Predictions for new rows: every fold's members -> the fold's blend -> mean over folds."""
    directory = Path(directory)
    manifest = json.loads((directory / "stack.json").read_text())
    neural = set(manifest["config"]["neural_columns"])
    fold_preds = []
    for k in manifest["folds"]:
        P = []
        for name in manifest["members"]:
            kind = manifest["kinds"][name]
            member = load_member(kind, directory / "members" / f"{name}.fold{k}.{manifest['extensions'][name]}")
            cols = [name] if name in neural else manifest["feature_columns"]
            P.append(member.predict(X[cols]))
        fold_preds.append(blend(np.column_stack(P), manifest["blend"][str(k)]))
    return np.mean(fold_preds, axis=0)


def predict_stack_members(directory: str | Path, X: pd.DataFrame) -> pd.DataFrame:
    """Per-member predictions for new rows: one column per member (the mean over folds of that member's fold
    models, as the stack's test predictions are) and ``blend`` (what ``predict_stack`` returns)."""
    directory = Path(directory)
    manifest = json.loads((directory / "stack.json").read_text())
    neural = set(manifest["config"]["neural_columns"])
    per_member: dict[str, list[np.ndarray]] = {name: [] for name in manifest["members"]}
    blends = []
    for k in manifest["folds"]:
        P = []
        for name in manifest["members"]:
            kind = manifest["kinds"][name]
            member = load_member(kind, directory / "members" / f"{name}.fold{k}.{manifest['extensions'][name]}")
            P.append(member.predict(X[[name] if name in neural else manifest["feature_columns"]]))
            per_member[name].append(P[-1])
        blends.append(blend(np.column_stack(P), manifest["blend"][str(k)]))
    out = {name: np.mean(preds, axis=0) for name, preds in per_member.items()}
    return pd.DataFrame({**out, "blend": np.mean(blends, axis=0)}, index=X.index)
