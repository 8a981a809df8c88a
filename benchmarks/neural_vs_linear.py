"""Neural modules of a finished run vs linear baselines on the same frozen CLIP features, out of fold.

    python benchmarks/neural_vs_linear.py RUN_DIR

* subcategory accuracy of the prompt/prototype module (each fold's checkpoint on its held-out fold: the fused
  prediction and each head alone) vs logistic-regression linear probes on [CLIP image; CLIP text], image alone and
  text alone, with the same folds;
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

    from popstack.datamodules.cached import EmbeddingDataModule, load_embedding_cache
    from popstack.pipeline.neural import load_module
    from popstack.stacking.metrics import scores

    run = a.run_dir
    cache = load_embedding_cache(run / "embeddings")
    folds = pd.read_parquet(run / "folds.parquet").fold.to_numpy()
    posts = pd.read_parquet(run / "posts.parquet", columns=["post_id", "label", "subcategory"])
    vocab = json.loads((run / "vocab.json").read_text())["subcategory"]
    y_cls = posts.subcategory.map({n: i for i, n in enumerate(vocab)}).fillna(-1).astype(int).to_numpy()
    blocks = {"[image; text]": np.hstack([cache["image_emb"], cache["text_emb"]]),
              "image": np.asarray(cache["image_emb"]), "text": np.asarray(cache["text_emb"])}
    X = {name: StandardScaler().fit_transform(b) for name, b in blocks.items()}
    labelled = folds >= 0
    rows_cls, rows_reg = [], []

    probe_pred = {name: np.full(len(posts), -1) for name in X}
    ridge_pred = np.full(len(posts), np.nan)
    heads = {"fused heads (the module's prediction)": None, "global prompt head": "global_logits",
             "local prompt head": "local_logits", "prototype head": "proto_logits"}
    ppm_pred = {name: np.full(len(posts), -1) for name in heads}
    row_of = pd.Series(np.arange(len(posts)), index=posts.post_id)
    for k in np.unique(folds[labelled]):
        tr, va = labelled & (folds != k), folds == k
        for name, x in X.items():
            probe_pred[name][va] = LogisticRegression(max_iter=2000, C=1.0).fit(x[tr], y_cls[tr]).predict(x[va])
        ridge_pred[va] = Ridge(alpha=10.0).fit(X["[image; text]"][tr], posts.label[tr]).predict(X["[image; text]"][va])
        done = run / "neural" / "prompt_prototype" / f"fold{k}" / "done.json"
        if done.is_file():
            module = load_module("prompt_prototype", json.loads(done.read_text())["best"]).eval()
            dm = EmbeddingDataModule(str(run / "embeddings"), str(run / "posts.parquet"), str(run / "folds.parquet"),
                                     str(run / "vocab.json"), fold=int(k), batch_size=256)
            with torch.no_grad():
                for batch in dm.val_dataloader():
                    out = module(batch)
                    rows = row_of.loc[list(batch["post_id"])].to_numpy()
                    for name, key in heads.items():
                        scores_k = module.class_scores(out) if key is None else out[key]
                        ppm_pred[name][rows] = scores_k.argmax(-1).numpy()
    known = labelled & (y_cls >= 0)
    chance = np.bincount(y_cls[known]).max() / known.sum()

    def accuracy(pred: np.ndarray) -> float:
        return round(float((pred[known] == y_cls[known]).mean()), 4)

    rows_cls.append({"model": "majority class (chance)", "oof_accuracy": round(float(chance), 4)})
    for name, pred in probe_pred.items():
        rows_cls.append({"model": f"linear probe (logistic, frozen CLIP {name})", "oof_accuracy": accuracy(pred)})
    for name, pred in ppm_pred.items():
        if (pred[known] >= 0).any():
            rows_cls.append({"model": f"prompt/prototype module: {name}", "oof_accuracy": accuracy(pred)})
    y = posts.label.to_numpy()
    rows_reg.append({"model": "ridge on frozen CLIP features", **{k: round(v, 4) for k, v in
                                                                   scores(y[labelled], ridge_pred[labelled]).items()}})
    preds = pd.read_parquet(run / "neural" / "predictions.parquet")
    for col in preds.columns[1:]:
        reg = scores(y[labelled], preds[col][labelled])
        rows_reg.append({"model": col, **{k: round(v, 4) for k, v in reg.items()}})
    print_table(rows_cls, f"subcategory classification ({len(vocab)} classes), out of fold")
    print_table(rows_reg, "popularity regression, out of fold")
    write_results("neural_vs_linear", {"run": str(run), "classification": rows_cls, "regression": rows_reg})


if __name__ == "__main__":
    main()
