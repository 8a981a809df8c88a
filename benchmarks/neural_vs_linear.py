"""Neural modules of a finished run vs linear baselines on the same frozen CLIP features, out of fold.

    python benchmarks/neural_vs_linear.py RUN_DIR

* subcategory accuracy of the prompt/prototype module (each fold's checkpoint on its held-out fold) vs a
  logistic-regression linear probe on [CLIP image; CLIP text] features with the same folds;
* SRC/MAE of each neural regressor's out-of-fold predictions vs ridge regression on the same CLIP features.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import print_table, write_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    a = p.parse_args()
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    from datamodules.cached import EmbeddingDataModule, load_embedding_cache
    from pipeline.neural import load_module
    from stacking.metrics import scores

    run = a.run_dir
    cache = load_embedding_cache(run / "embeddings")
    folds = pd.read_parquet(run / "folds.parquet").fold.to_numpy()
    posts = pd.read_parquet(run / "posts.parquet", columns=["post_id", "label", "subcategory"])
    vocab = json.loads((run / "vocab.json").read_text())["subcategory"]
    y_cls = posts.subcategory.map({n: i for i, n in enumerate(vocab)}).fillna(-1).astype(int).to_numpy()
    X = StandardScaler().fit_transform(np.hstack([cache["image_emb"], cache["text_emb"]]))
    labelled = folds >= 0
    rows_cls, rows_reg = [], []

    probe_pred = np.full(len(posts), -1)
    ridge_pred = np.full(len(posts), np.nan)
    ppm_pred = np.full(len(posts), -1)
    for k in np.unique(folds[labelled]):
        tr, va = labelled & (folds != k), folds == k
        probe_pred[va] = LogisticRegression(max_iter=2000, C=1.0).fit(X[tr], y_cls[tr]).predict(X[va])
        ridge_pred[va] = Ridge(alpha=10.0).fit(X[tr], posts.label[tr]).predict(X[va])
        done = run / "neural" / "prompt_prototype" / f"fold{k}" / "done.json"
        if done.is_file():
            module = load_module("prompt_prototype", json.loads(done.read_text())["best"]).eval()
            dm = EmbeddingDataModule(str(run / "embeddings"), str(run / "posts.parquet"), str(run / "folds.parquet"),
                                     str(run / "vocab.json"), fold=int(k), batch_size=256)
            with torch.no_grad():
                for batch in dm.val_dataloader():
                    idx = posts.index[posts.post_id.isin(batch["post_id"])]
                    order = pd.Series(range(len(batch["post_id"])), index=batch["post_id"])
                    logits = module.class_scores(module(batch)).argmax(-1).numpy()
                    ppm_pred[idx] = logits[order.loc[posts.post_id[idx]].to_numpy()]
    known = labelled & (y_cls >= 0)
    chance = np.bincount(y_cls[known]).max() / known.sum()
    rows_cls.append({"model": "majority class (chance)", "oof_accuracy": round(float(chance), 4)})
    rows_cls.append({"model": "linear probe (logistic, frozen CLIP)", "oof_accuracy":
                     round(float((probe_pred[known] == y_cls[known]).mean()), 4)})
    if (ppm_pred >= 0).any():
        rows_cls.append({"model": "prompt/prototype module (fused heads)", "oof_accuracy":
                         round(float((ppm_pred[known] == y_cls[known]).mean()), 4)})
    y = posts.label.to_numpy()
    rows_reg.append({"model": "ridge on frozen CLIP features", **{k: round(v, 4) for k, v in
                                                                   scores(y[labelled], ridge_pred[labelled]).items()}})
    preds = pd.read_parquet(run / "neural" / "predictions.parquet")
    for col in preds.columns[1:]:
        rows_reg.append({"model": col, **{k: round(v, 4) for k, v in scores(y[labelled], preds[col][labelled]).items()}})
    print_table(rows_cls, f"subcategory classification ({len(vocab)} classes), out of fold")
    print_table(rows_reg, "popularity regression, out of fold")
    write_results("neural_vs_linear", {"run": str(run), "classification": rows_cls, "regression": rows_reg})


if __name__ == "__main__":
    main()
