"""Checkpoint-based inference on new posts: one prediction per post id.

    python predict.py RUN_DIR RAW_DIR --out predictions.json [--devices 1]

RUN_DIR is a finished ``train.py`` run (its ``config.yaml``, feature state, checkpoints and stacker are all that is
read); RAW_DIR holds posts in the SMPD layout (either or both splits; labels are not needed and are ignored).
The output format follows the extension: ``.json`` (the SMP submission format, in file order), ``.parquet`` or
``.csv`` (``post_id, split, popularity_score``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("popstack")
OUTPUT_FORMATS = (".json", ".parquet", ".csv")


def predict(run_dir: Path, raw_dir: Path, out: Path, devices: int | None = None, work_dir: Path | None = None):
    """Predictions for every post of ``raw_dir``, written to ``out``; returns the DataFrame."""
    import numpy as np
    import pandas as pd
    from omegaconf import open_dict

    from datamodules.schema import KEY
    from features.build import transform_features
    from features.preprocess import Standardiser
    from features.state import FeatureState
    from pipeline.config import load_run_config
    from pipeline.errors import UserError
    from pipeline.featurize import TABULAR, TABULAR_SCALER, feature_config
    from pipeline.neural import backbone_file, build_cache, load_pca, neural_outputs
    from pipeline.prepare import prepare_new_posts
    from pipeline.report import write_submission
    from pipeline.stack import stack_inputs
    from stacking.stack import predict_stack

    cfg = load_run_config(run_dir)
    if out.suffix not in OUTPUT_FORMATS:
        raise UserError(f"--out must end with one of {', '.join(OUTPUT_FORMATS)}: {out}")
    if not (run_dir / "stack" / "model" / "stack.json").is_file():
        raise UserError(f"{run_dir}: the run has no trained stacker (stack/model/stack.json); finish train.py first")
    if not raw_dir.is_dir():
        raise UserError(f"raw posts directory not found: {raw_dir}")
    if devices is not None:
        with open_dict(cfg):
            cfg.trainer.devices = devices
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write to {out.parent}")

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        posts = prepare_new_posts(cfg, run_dir, raw_dir, work)
        log.info("predict: %d posts from %s", len(posts), raw_dir)
        fcfg = feature_config(cfg)
        feats = transform_features(posts, FeatureState.load(run_dir / "features" / "state"), fcfg,
                                   image_dir=work / "shards")
        scaler = Standardiser.load(run_dir / "features" / TABULAR_SCALER)
        tab = pd.DataFrame(scaler.transform(feats[scaler.columns]), columns=scaler.columns)
        tab.insert(0, KEY, feats[KEY].to_numpy())
        (work / "features").mkdir()
        tab.to_parquet(work / "features" / TABULAR, index=False)

        weights = backbone_file(cfg, run_dir)
        if not Path(weights).is_file():
            raise UserError(f"backbone weights {weights} are missing from the run")
        build_cache(cfg, work, weights=weights)
        pca = load_pca(run_dir / "neural" / "pca.npz")
        nf, preds = neural_outputs(cfg, work, run_dir, pca)

    train_cols, _, _ = stack_inputs(run_dir)
    X = pd.concat([feats.reset_index(drop=True), nf.drop(columns=[KEY]), preds.drop(columns=[KEY])], axis=1)
    X = X[[c for c in train_cols.columns if c != KEY]].astype(np.float32)
    scores = predict_stack(run_dir / "stack" / "model", X)
    result = pd.DataFrame({KEY: posts[KEY].to_numpy(), "split": posts["split"].to_numpy(), "popularity_score": scores})
    if out.suffix == ".json":
        write_submission(result[KEY].tolist(), result.popularity_score.to_numpy(), out,
                         details=f"popstack predict.py with run {run_dir.name}")
    elif out.suffix == ".parquet":
        result.to_parquet(out, index=False)
    else:
        result.to_csv(out, index=False)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished train.py run directory")
    parser.add_argument("raw_dir", type=Path, help="new posts in the SMPD layout")
    parser.add_argument("--out", type=Path, required=True, help="output file (.json, .parquet or .csv)")
    parser.add_argument("--devices", type=int, default=None, help="devices for the neural models (default: the run's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|GPU available).*")
    from pipeline.errors import user_error_types
    from pipeline.training import quiet_lightning

    quiet_lightning()
    try:
        result = predict(args.run_dir.resolve(), args.raw_dir.resolve(), args.out, devices=args.devices)
    except user_error_types() as err:
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(result)} predictions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
