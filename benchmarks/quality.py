"""Quality side by side: popstack's defaults vs a flat-table LightGBM vs AutoGluon-Tabular, same split, same posts.

    python benchmarks/quality.py --worlds 1,2,3,4,5 --sizes 2000,8000 [--real DIR ...] \
        [--autogluon-python /path/to/venv/bin/python] [--experiment smpd] [--overrides "n_folds=3 ..."]

For every case (a synthetic world at a size, or a real SMPD-layout directory) the three systems see the same
posts and the same chronological split and are scored on the test split, whose labels the data directory keeps
aside in ``signal.parquet`` (``post_id, split, label`` and, for synthetic data, the noise-free ``signal``):

* **popstack**: ``train.train(cfg)`` with ``experiment=<--experiment> backbone=tiny trainer=cpu`` (what a user without
  a GPU or pretrained CLIP weights runs on an SMPD-layout directory; default ``smpd``) plus ``--overrides`` (the
  blend's test prediction);
* **lightgbm_flat**: what a user tries first, LightGBM (huber, 300 rounds) on a flat table of the raw fields:
  numeric fields as numbers, dates as epoch seconds, categoricals (user, category, subcategory, concept,
  mediatype, time zone) as pandas ``category``, title/tag lengths and four image colour statistics (mean red,
  green, blue and brightness, NaN without an image);
* **autogluon**: AutoGluon-Tabular ``medium_quality`` on the same table, run by ``benchmarks/autogluon_runner.py``
  in its own environment (``--autogluon-python`` or ``$POPSTACK_AUTOGLUON_PYTHON``; AutoGluon pins pandas < 2.4,
  popstack uses pandas 3). Without one the benchmark says so and skips it.

Printed per case: test SRC, test MAE, wall seconds, the ceiling SRC (synthetic: SRC of the noise-free signal
against the labels) and the gap to it, and whether the target holds: popstack SRC >= AutoGluon SRC + 0.01, MAE no
higher, wall time <= 3x AutoGluon's. Wall seconds: popstack's whole ``train(cfg)`` (data generation excluded);
the flat systems' fit + predict plus the flat table's construction (image statistics included).
A size is the number of posts; a quarter of them (the latest) are the test split.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, print_table, write_results

NUMERIC = ("postdate", "latitude", "longitude", "geoaccuracy", "photo_count", "ispro", "canbuypro",
           "photo_firstdate", "photo_firstdatetaken", "ispublic")
CATEGORICAL = ("uid", "category", "subcategory", "concept", "mediatype", "timezone_id")
COLOUR = ("red", "green", "blue", "brightness")
TARGET_SRC_MARGIN, TARGET_TIME_FACTOR = 0.01, 3.0


def flat_table(posts: pd.DataFrame, raw_root: Path) -> pd.DataFrame:
    """(n posts, 24) the raw fields as a user would flatten them (see the module docstring), in ``posts`` order."""
    from popstack.features.image_stats import image_statistics

    X = posts[list(NUMERIC)].astype(float).copy()
    for c in CATEGORICAL:
        X[c] = posts[c].astype("category")
    X["title_chars"] = posts.title.str.len()
    X["title_words"] = posts.title.str.split().str.len()
    X["n_tags"] = posts.alltags.str.split().str.len()
    X["tags_chars"] = posts.alltags.str.len()
    colour = []
    for rel in posts.image_relpath:
        path = raw_root / rel
        stats = image_statistics(path.read_bytes()) if path.is_file() and path.stat().st_size else None
        colour.append([stats[k] if stats else np.nan for k in COLOUR])
    X[list(COLOUR)] = np.asarray(colour, dtype=float)
    return X.reset_index(drop=True)


def fit_lightgbm(X_tr: pd.DataFrame, y_tr: np.ndarray, X_te: pd.DataFrame) -> np.ndarray:
    import lightgbm as lgb

    model = lgb.train({"objective": "huber", "verbosity": -1, "seed": 0, "num_threads": 2},
                      lgb.Dataset(X_tr, y_tr), num_boost_round=300)
    return model.predict(X_te)


def autogluon_python(flag: str | None) -> str | None:
    """The interpreter that has AutoGluon: the flag, ``$POPSTACK_AUTOGLUON_PYTHON``, or this one if it has it."""
    candidate = flag or os.environ.get("POPSTACK_AUTOGLUON_PYTHON")
    if candidate:
        if not Path(candidate).is_file():
            raise SystemExit(f"--autogluon-python {candidate}: no such interpreter")
        return candidate
    try:
        import autogluon.tabular  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def fit_autogluon(python: str, X_tr: pd.DataFrame, y_tr: np.ndarray, X_te: pd.DataFrame, work: Path,
                  preset: str) -> np.ndarray:
    work.mkdir(parents=True, exist_ok=True)
    X_tr.assign(label=y_tr).to_parquet(work / "train.parquet", index=False)
    X_te.to_parquet(work / "test.parquet", index=False)
    runner = ROOT / "benchmarks" / "autogluon_runner.py"
    done = subprocess.run([python, str(runner), str(work), "--preset", preset], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"autogluon_runner failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return pd.read_parquet(work / "autogluon_predictions.parquet")["prediction"].to_numpy()


def run_popstack(overrides: list[str], tmp: Path) -> tuple[Path, float, Path]:
    """``train(cfg)`` in ``tmp``; returns (run dir, wall seconds without data generation, raw data root)."""
    from popstack import train
    from popstack.pipeline.config import compose_config
    from popstack.pipeline.stages.prepare import raw_root

    cfg = compose_config([f"paths.root_dir={tmp}", f"hydra.run.dir={tmp}/run", "logger=none", "progress_bar=false",
                          *overrides])
    root = raw_root(cfg)  # generates synthetic data (not timed)
    start = time.perf_counter()
    train(cfg)
    return Path(cfg.run_dir), time.perf_counter() - start, root


def run_case(name: str, data_overrides: list[str], a: argparse.Namespace, ag_python: str | None) -> list[dict]:
    from popstack.datamodules.smpd import read_posts
    from popstack.stacking.metrics import scores

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp) if a.workdir is None else Path(a.workdir) / name
        run, popstack_s, root = run_popstack([*data_overrides, *shlex.split(a.overrides)], tmp)
        truth = pd.read_parquet(root / "signal.parquet").set_index("post_id")
        posts = read_posts(run / "posts.parquet")
        test = (posts.split == "test").to_numpy()
        y_all = truth.loc[posts.post_id, "label"].to_numpy()
        y_te = y_all[test]
        ceiling = scores(y_te, truth.loc[posts.post_id[test], "signal"].to_numpy())["src"] \
            if "signal" in truth.columns else None
        base = {"case": name, "n_train": int((~test).sum()), "n_test": int(test.sum()), "ceiling_src": ceiling}

        def add(system: str, pred: np.ndarray, seconds: float) -> None:
            s = scores(y_te, pred)
            gap = None if ceiling is None else round(ceiling - s["src"], 4)
            rows.append({**base, "system": system, "test_src": round(s["src"], 4), "test_mae": round(s["mae"], 4),
                         "wall_s": round(seconds, 1), "gap_to_ceiling": gap})

        stack = pd.read_parquet(run / "stack" / "predictions.parquet").set_index("post_id").loc[posts.post_id[test]]
        add("popstack", stack["prediction"].to_numpy(), popstack_s)
        for member in stack.columns.drop("prediction"):
            add(f"  popstack:{member}", stack[member].to_numpy(), float("nan"))
        start = time.perf_counter()
        X = flat_table(posts, root)
        table_s = time.perf_counter() - start
        start = time.perf_counter()
        add("lightgbm_flat", fit_lightgbm(X[~test], y_all[~test], X[test]), table_s + time.perf_counter() - start)
        if ag_python:
            start = time.perf_counter()
            pred = fit_autogluon(ag_python, X[~test], y_all[~test], X[test], tmp / "autogluon", a.preset)
            add("autogluon", pred, table_s + time.perf_counter() - start)
    verdict(rows)
    return rows


def verdict(rows: list[dict]) -> None:
    """Adds ``target`` to the popstack row: holds, or which of SRC / MAE / time misses and by how much."""
    by = {r["system"]: r for r in rows}
    if "autogluon" not in by:
        by["popstack"]["target"] = "n/a (no AutoGluon)"
        return
    p, g = by["popstack"], by["autogluon"]
    misses = []
    if p["test_src"] < g["test_src"] + TARGET_SRC_MARGIN:
        misses.append(f"SRC {p['test_src'] - g['test_src']:+.4f}")
    if p["test_mae"] > g["test_mae"]:
        misses.append(f"MAE {p['test_mae'] - g['test_mae']:+.4f}")
    if p["wall_s"] > TARGET_TIME_FACTOR * g["wall_s"]:
        misses.append(f"time {p['wall_s'] / g['wall_s']:.1f}x")
    p["target"] = "holds" if not misses else "misses: " + ", ".join(misses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="1,2,3,4,5", help="synthetic worlds (data.synthetic.world); '' = none")
    p.add_argument("--sizes", default="2000,8000", help="posts per synthetic case (a quarter are test posts)")
    p.add_argument("--real", action="append", default=[], help="a real SMPD-layout directory with signal.parquet")
    p.add_argument("--experiment", default="smpd", help="popstack's experiment config (with backbone=tiny trainer=cpu)")
    p.add_argument("--overrides", default="", help="further popstack config overrides")
    p.add_argument("--autogluon-python", default=None, help="interpreter of an environment with AutoGluon")
    p.add_argument("--preset", default="medium_quality")
    p.add_argument("--name", default="quality", help="results file benchmarks/results/<name>.json")
    p.add_argument("--workdir", default=None, help="keep each case's data and run in WORKDIR/<case> (default: "
                                                   "a temporary directory, removed)")
    a = p.parse_args()
    if a.workdir is not None:
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
    ag_python = autogluon_python(a.autogluon_python)
    if ag_python is None:
        print("AutoGluon: not installed here and no --autogluon-python / $POPSTACK_AUTOGLUON_PYTHON given: skipped "
              "(pip install 'popstack[bench]' into a separate environment; see benchmarks/autogluon_runner.py)")
    base = [f"experiment={a.experiment}", "backbone=tiny", "trainer=cpu"]
    cases = [(f"world{w}-{n}", [*base, "data=synthetic", f"data.synthetic.world={w}",
                                f"data.synthetic.n_train={n - n // 4}", f"data.synthetic.n_test={n // 4}"])
             for n in map(int, filter(None, a.sizes.split(","))) for w in map(int, filter(None, a.worlds.split(",")))]
    cases += [(Path(d).name, [*base, "data=smpd", f"data.root={Path(d).resolve()}"]) for d in a.real]
    rows: list[dict] = []
    for name, overrides in cases:
        case_rows = run_case(name, overrides, a, ag_python)
        print_table(case_rows, f"{name} (test split)")
        rows += case_rows
        write_results(a.name, {"command": " ".join(sys.argv), "experiment": a.experiment, "overrides": a.overrides,
                               "rows": rows})
    print_table([r for r in rows if not r["system"].startswith(" ")], "all cases (test split)")


if __name__ == "__main__":
    main()
