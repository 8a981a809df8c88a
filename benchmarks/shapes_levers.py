"""Issue 22's levers on the data shapes of ``tests/test_real_shapes.py``: the full pipeline with the defaults for real
data (time folds, held-back slice, guards, refit) and one change at a time, scored on the test split against the
generator's labels, next to a flat LightGBM on the same posts.

    .venv/bin/python benchmarks/shapes_levers.py OUT trend default stacking.refit_full=false folds.strategy=random

Shapes: ``trend`` (1,200 posts, +4 log-views over the time span), ``one_author`` (1,200 posts, one user, no images),
``plain`` (1,200 posts of world 0 with images). Each variant is a comma-separated list of overrides (``default`` =
none); runs with the same folds share one run directory, so a stacking-only variant reruns only stack and report.
Debug-sized neural training (``debug=fast``: 1 epoch, co-attention MLP only), 3 folds, no sentence encoder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
from common import ROOT, print_table, write_results  # noqa: F401  (ROOT: the repository on sys.path)


def _plain(root: Path) -> pd.Series:
    from popstack.datamodules.synthetic import make_posts, write_smpd

    posts, signal, labels = make_posts(900, 300, seed=7)
    write_smpd(root, posts, signal, labels, seed=0, image_mess=False)
    return pd.Series(labels, index=posts["post_id"].to_numpy())


def _shape(name: str):
    from tests.test_real_shapes import one_author_without_images, strong_trend

    return {"trend": lambda root: strong_trend(root, 900, 300),
            "one_author": lambda root: one_author_without_images(root, 900, 300), "plain": _plain}[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("shape", choices=["trend", "one_author", "plain"])
    p.add_argument("variants", nargs="+")
    a = p.parse_args()
    from popstack import train
    from popstack.stacking.metrics import scores
    from tests.helpers import compose_fast
    from tests.test_real_shapes import flat_lightgbm_mae

    raw, truth_file = a.out / f"raw-{a.shape}", a.out / f"truth-{a.shape}.parquet"
    if not raw.exists():
        _shape(a.shape)(raw).to_frame("label").to_parquet(truth_file)
    truth = pd.read_parquet(truth_file)["label"]
    rows = []
    for v in a.variants:
        extra = [] if v == "default" else v.split(",")
        strategy = "random" if "folds.strategy=random" in extra else "time"
        cfg = compose_fast(a.out, "data=smpd", f"data.root={raw}", "data.shard_size=500", "n_folds=3",
                           "model.prompt_prototype.enabled=false", "model.hierarchical.enabled=false",
                           "features.sentence_model=", "stacking.pseudo_rounds=0",
                           "stacking.members.catboost.iterations=300", "stacking.members.lightgbm.n_estimators=300",
                           f"run_dir={a.out}/run-{a.shape}-{strategy}", *extra)
        start = time.perf_counter()
        report = train(cfg)["report"]
        run = Path(cfg.run_dir)
        posts = pd.read_parquet(run / "posts.parquet")
        preds = pd.read_parquet(run / "predictions.parquet").set_index("post_id")
        ids = posts.post_id[posts.split == "test"]
        test = scores(truth[ids].to_numpy(), preds.prediction[ids].to_numpy())
        rows.append({"shape": a.shape, "variant": v, "heldback_src": round(report["headline_src"], 4),
                     "heldback_mae": round(report["headline_mae"], 4), "test_src": round(test["src"], 4),
                     "test_mae": round(test["mae"], 4), "flat_lgbm_test_mae": round(flat_lightgbm_mae(posts, truth), 4),
                     "dropped": json.dumps(pd.read_csv(run / "stack" / "dropped.csv").member.tolist()),
                     "seconds": round(time.perf_counter() - start, 1)})
    print_table(rows, f"issue 22 levers, shape {a.shape}")
    write_results(f"shapes_levers_{a.shape}", {"rows": rows})


if __name__ == "__main__":
    main()
