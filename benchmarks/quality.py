"""Quality vs ceiling: run the pipeline on synthetic data of a few sizes; SRC/MAE of every member and the blend
next to the ceiling (the generator's noise-free signal) and a baseline (plain LightGBM on the flattened
metadata), all on the test split, whose true labels the generator keeps aside.

    python benchmarks/quality.py [--sizes 2000,8000] [--overrides "stacking.ablation.enabled=false"]
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

from common import print_table, write_results


def baseline(posts, labels_all):
    """LightGBM on the metadata as it comes (numbers, category codes, text lengths): the flattened table."""
    import lightgbm as lgb
    import numpy as np

    X = posts[["postdate", "latitude", "longitude", "geoaccuracy", "photo_count", "ispro", "photo_firstdate",
               "photo_firstdatetaken", "ispublic"]].astype(float).copy()
    for col in ("uid", "category", "subcategory", "concept"):
        X[col] = posts[col].astype("category").cat.codes
    X["title_len"] = posts.title.str.len()
    X["n_tags"] = posts.alltags.str.split().str.len()
    train = (posts.split == "train").to_numpy()
    model = lgb.train({"objective": "huber", "verbosity": -1, "seed": 0, "num_threads": 2}, lgb.Dataset(
        X[train], labels_all[train]), num_boost_round=300)
    return model.predict(X[~train])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000")
    p.add_argument("--overrides", default="stacking.ablation.enabled=false")
    a = p.parse_args()
    import numpy as np
    import pandas as pd

    from datamodules.smpd import read_posts
    from pipeline.config import compose_config
    from stacking.metrics import scores
    from train import train

    rows = []
    for n in map(int, a.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_config([f"paths.root_dir={tmp}", f"hydra.run.dir={tmp}/run", "logger=none",
                                  f"data.synthetic.n_train={n}", f"data.synthetic.n_test={n // 4}",
                                  *shlex.split(a.overrides)])
            train(cfg)
            run = Path(cfg.run_dir)
            sig = pd.read_parquet(Path(cfg.data.root) / "signal.parquet").set_index("post_id")
            posts = read_posts(run / "posts.parquet")
            test = (posts.split == "test").to_numpy()
            truth = sig.loc[posts.post_id[test], "label"].to_numpy()
            stack = pd.read_parquet(run / "stack" / "predictions.parquet").set_index("post_id").loc[posts.post_id[test]]
            stack = stack.rename(columns={"prediction": "blend"})
            row = {"n_train": n, "ceiling_src": scores(truth, sig.loc[posts.post_id[test], "signal"])["src"]}
            labels_all = sig.loc[posts.post_id, "label"].to_numpy()
            b = scores(truth, baseline(posts, labels_all))
            row.update(baseline_lgbm_src=b["src"], baseline_lgbm_mae=b["mae"])
            for col in stack.columns:
                s = scores(truth, stack[col].to_numpy())
                row[f"{col}_src"], row[f"{col}_mae"] = s["src"], s["mae"]
            rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    long = [{"n_train": r["n_train"], "model": k.removesuffix("_src"), "test_src": v,
             "test_mae": r.get(k.removesuffix("_src") + "_mae")} for r in rows for k, v in r.items() if k.endswith("_src")]
    print_table(long, "test-split quality (true labels kept aside by the generator)")
    write_results("quality", {"rows": rows})


if __name__ == "__main__":
    main()
