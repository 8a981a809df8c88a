"""Checkpoint-based inference from Python: load a finished run directory once, predict new posts.

    from popstack.pipeline.inference import Predictor
    predictor = Predictor.from_run_dir("outputs/demo/2026-01-01_00-00-00")
    scores = predictor.predict("/data/new_posts")                     # in the form of the run's data source
    scores = predictor.predict(frame, image_root="/data/images")      # or a DataFrame of posts

Both return a DataFrame keyed by ``post_id`` (columns ``split``, ``popularity_score`` in log-views), in input order;
``result.attrs["popstack"]`` holds the run, the number of posts and of missing images. What is read from the run:
``config.yaml``, the fitted feature state and standardiser, the PCA of the neural features, the neural checkpoints,
the backbone weights and the stacker (``stack/model``); nothing else.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, open_dict

from popstack.datamodules.atomic import atomic_path
from popstack.datamodules.schema import (
    COLUMNS,
    FLOAT_COLUMNS,
    IMAGE_MISSING,
    IMAGE_OK,
    INT_COLUMNS,
    KEY,
    NULLABLE_STRING_COLUMNS,
    VECTOR_COLUMNS,
)
from popstack.pipeline.errors import UserError
from popstack.pipeline.layout import RunLayout

log = logging.getLogger("popstack")

#: Columns a DataFrame of posts must have (the image path may also be given as ``image_relpath``).
REQUIRED_FRAME_COLUMNS = (KEY, "uid", "image_path")


def posts_from_frame(frame: pd.DataFrame, image_root: Path) -> pd.DataFrame:
    """A posts table (``datamodules.schema.COLUMNS``) from a user DataFrame of posts.

    Needs ``post_id``, ``uid`` and ``image_path`` (absolute, or relative to ``image_root``); any other column of
    the posts table is taken when present and otherwise filled as a reader fills an absent field (empty text,
    NaN numbers, no vectors). Names and types are checked first (``pipeline.posts_frame``: SMPD spellings such
    as ``Title`` are mapped, unknown columns and wrong types refused by name). Rows keep their order; ``split``
    defaults to ``test``.
    """
    from popstack.pipeline.posts_frame import normalise_frame

    frame = normalise_frame(frame)  # SMPD spellings mapped, unknown columns and wrong types refused by name
    missing = [c for c in REQUIRED_FRAME_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"posts DataFrame: missing column(s) {missing}; needed: {list(REQUIRED_FRAME_COLUMNS)}")
    ids = frame[KEY].astype(str)
    if ids.duplicated().any():
        raise UserError(f"posts DataFrame: duplicate {KEY} values, e.g. {ids[ids.duplicated()].head(3).tolist()}")
    n = len(frame)
    paths = [str((image_root / str(p)).resolve()) for p in frame["image_path"]]
    out = {}
    for col in COLUMNS:
        if col in frame.columns and col != "image_relpath":
            out[col] = frame[col].to_numpy()
        elif col in FLOAT_COLUMNS:
            out[col] = np.full(n, np.nan)
        elif col in INT_COLUMNS:
            out[col] = np.arange(n) if col == "row" else np.zeros(n, dtype=np.int64)
        elif col in VECTOR_COLUMNS or col in NULLABLE_STRING_COLUMNS:
            out[col] = [None] * n
        else:
            out[col] = [""] * n
    posts = pd.DataFrame(out)
    posts[KEY] = ids
    posts["image_relpath"] = paths
    posts["split"] = frame["split"].to_numpy() if "split" in frame.columns else "test"
    posts["image_status"] = [IMAGE_OK if Path(p).is_file() else IMAGE_MISSING for p in paths]
    posts["label"] = np.nan
    for col in INT_COLUMNS:
        posts[col] = posts[col].astype(np.int64)
    for col in FLOAT_COLUMNS:
        posts[col] = posts[col].astype(np.float64)
    return posts[list(COLUMNS)]


#: What a run trained on GPUs predicts with on a machine without CUDA.
CPU_PLACEMENT = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true"}
GPU_ACCELERATORS = ("gpu", "cuda")


def placement_for_this_machine(trainer: DictConfig, accelerator: str | None, devices: int | None,
                               precision: str | None) -> dict:
    """The ``trainer`` keys that place prediction: the run's, with the given ones instead.

    The run's GPU accelerator on a machine without CUDA becomes ``CPU_PLACEMENT`` (one process, ``32-true``; an
    explicit ``devices``/``precision`` is still honoured) with one warning line; an explicit ``accelerator="cpu"``
    likewise drops the run's GPU settings (silently); an explicit GPU accelerator without CUDA is a ``UserError``.
    """
    import torch

    from popstack.pipeline.schema import ACCELERATORS
    from popstack.pipeline.training import trainer_setting

    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision")
    out = {k: trainer[k] for k in keys if k in trainer}  # a key the run left to Lightning stays unset
    want = str(accelerator if accelerator is not None else trainer_setting(trainer, "accelerator")).lower()
    if accelerator is not None and want not in ACCELERATORS:
        raise UserError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    if devices is not None and int(devices) < 1:
        raise UserError(f"devices must be 1 or more, got {devices}")
    gpu_asked = want in GPU_ACCELERATORS
    if gpu_asked and accelerator is not None and not torch.cuda.is_available():
        raise UserError(f"accelerator={accelerator} asked for, but this machine has no CUDA GPU "
                        f"(leave it out, or use accelerator=cpu)")
    if (gpu_asked and not torch.cuda.is_available()) or (accelerator is not None and want == "cpu"):
        if gpu_asked:
            log.warning("predict: the run's trainer asks for accelerator=%s but this machine has no CUDA GPU; "
                        "predicting on the CPU (%s)", want, CPU_PLACEMENT["precision"])
        out.update(CPU_PLACEMENT)
    elif accelerator is not None:
        out["accelerator"] = want
    if devices is not None:
        out["devices"] = int(devices)
    if precision is not None:
        out["precision"] = str(precision)
    return out


def predictor_files(run_dir: str | Path, cfg: DictConfig) -> list[Path]:
    """Everything ``Predictor`` reads from a finished run (what the W&B ``predictor`` artifact holds): the config,
    vocab, feature state and standardiser, the extract state (PCA), the backbone weights, every fold's ``done.json``
    and the checkpoint it names, the stacker, and the manifests and files its consistency check verifies
    (``pipeline.run_check``). Raises ``UserError`` when one is missing."""
    from popstack.features.build import images_readable
    from popstack.features.state import FeatureState
    from popstack.pipeline.neural import (
        checkpoints,
        class_count,
        enabled_modules,
        f_checkpoint,
        f_model_dir,
        has_f_model,
        has_fold_models,
    )
    from popstack.pipeline.run_check import inference_files
    from popstack.pipeline.training import DONE

    run = RunLayout(Path(run_dir))
    images = images_readable(None, FeatureState.load(run.feature_state)) if run.feature_state.is_dir() else True
    files = [run.config, run.vocab, run.feature_state, run.tabular_scaler, run.extract_state, run.backbone,
             run.stack_model]
    for name in enabled_modules(cfg, images, class_count(run)):  # the modules the run trained
        if has_f_model(name):  # its one F model (eq. 11's blocks)
            files += [f_model_dir(run, name) / DONE, f_checkpoint(run, name)]
        if has_fold_models(cfg, name):
            for fold, best in checkpoints(cfg, run, name).items():
                files += [run.fold_dir(name, fold) / DONE, best]
    files = list(dict.fromkeys([*files, *inference_files(run.root)]))  # what check_run verifies, manifests included
    missing = [run.rel(p) for p in files if not p.exists()]
    if missing:
        raise UserError(f"{run.root}: not a finished run, missing {missing}")
    return files


class Predictor:
    """A finished run, loaded once: feature state, standardiser, PCA and stacker manifest; see the module docstring."""

    def __init__(self, run_dir: Path, cfg: DictConfig):
        from popstack.features.build import images_readable
        from popstack.features.preprocess import Standardiser
        from popstack.features.state import FeatureState
        from popstack.pipeline.neural import load_extract_state

        self.run_dir, self.cfg = run_dir, cfg
        self.run = RunLayout(run_dir)
        self.state = FeatureState.load(self.run.feature_state)
        #: the training run's decision on images (new posts follow it: no image tower, no image-only module)
        self.images = images_readable(None, self.state)
        self.scaler = Standardiser.load(self.run.tabular_scaler)
        self.extract_state = load_extract_state(self.run.extract_state)
        self.weights = str(self.run.backbone)
        if not self.run.backbone.is_file():
            raise UserError(f"backbone weights {self.weights} are missing from the run")
        stack = json.loads((self.run.stack_model / "stack.json").read_text())
        self.columns = list(stack["feature_columns"]) + list(stack["config"]["neural_columns"])

    @property
    def source(self):
        """The run's data source (``datamodules.sources``): new posts are read the way the run read its own."""
        from popstack.datamodules.sources import get_source

        return get_source(str(self.cfg.data.kind))

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, devices: int | None = None, progress_bar: bool = True, *,
                     accelerator: str | None = None, precision: str | None = None) -> "Predictor":
        """Load ``run_dir`` (a finished ``train.py`` run) to predict on this machine.

        ``accelerator`` (``cpu``, ``gpu``, ``auto``), ``devices`` (GPUs/processes for the neural models; with more
        than one, every rank takes part and the first writes the result) and ``precision`` (e.g. ``32-true``,
        ``bf16-mixed``) default to the run's ``trainer`` section; where that asks for a GPU and this machine has
        no CUDA, prediction falls back to the CPU with one warning line (see ``placement_for_this_machine``).
        """
        from popstack.pipeline.config import load_run_config
        from popstack.pipeline.run_check import check_run

        run_dir = Path(run_dir).resolve()
        cfg = load_run_config(run_dir)
        if not (RunLayout(run_dir).stack_model / "stack.json").is_file():
            raise UserError(f"{run_dir}: the run has no trained stacker (stack/model/stack.json); "
                            f"finish train.py first")
        check_run(run_dir, cfg)  # manifests, hash chain, config and model files: before any feature or neural work
        with open_dict(cfg):
            for key, value in placement_for_this_machine(cfg.trainer, accelerator, devices, precision).items():
                cfg.trainer[key] = value
            cfg.progress_bar = progress_bar
        return cls(run_dir, cfg)

    def predict(self, posts: str | Path | pd.DataFrame, image_root: str | Path = ".",
                work_dir: str | Path | None = None, members: bool = False) -> pd.DataFrame | None:
        """Scores of every post of ``posts``: a path in the form of the run's data source (``self.source.new_posts``:
        a directory in the SMPD layout, either or both splits; for ``data=table`` a CSV/Parquet file; labels
        ignored) or a DataFrame (see ``posts_from_frame``). Returns ``post_id, split, popularity_score``;
        ``members=True`` adds one column per stack member (its mean over the fold models; ``pred_<module>`` are the
        neural modules' own predictions), ``popularity_score`` being their blend.

        With several devices every rank calls this: all share one temporary folder (``shared_tmpdir``); rank 0
        lays the posts out and returns the result, the others encode and predict their share and return None.
        """
        from popstack.pipeline.distributed import shared_tmpdir, topology, wait_for, wait_timeout
        from popstack.pipeline.neural import build_cache, neural_outputs
        from popstack.pipeline.stages.prepare import lay_out_new_posts, prepare_new_posts

        with shared_tmpdir(work_dir, wait_timeout(self.cfg)) as work_root:
            work = RunLayout(work_root)  # the new posts laid out the way the run is
            if not topology().is_zero:
                wait_for(lambda: work.tabular.is_file(), f"{work_root} laid out by rank 0", wait_timeout(self.cfg))
                build_cache(self.cfg, work, weights=self.weights, images=self.images)
                neural_outputs(self.cfg, work, self.run, self.extract_state, images=self.images)
                return None
            if isinstance(posts, pd.DataFrame):
                if posts.empty:
                    raise UserError("posts DataFrame: no posts to predict")
                table = lay_out_new_posts(self.cfg, self.run, posts_from_frame(posts, Path(image_root)),
                                          Path("/"), work)
                source = f"a DataFrame of {len(posts)} posts"
            else:
                raw = Path(posts)
                if not raw.exists():
                    raise UserError(f"raw posts not found: {raw} (expected {self.source.new_posts})")
                table = prepare_new_posts(self.cfg, self.run, raw, work)
                source = str(raw)
            log.info("predict: %d posts from %s", len(table), source)
            X = self._stack_inputs(table, work)
        result = self._scores(table, X, members)
        result.attrs["popstack"] = self._metadata(table, source)
        return result

    def _scores(self, table: pd.DataFrame, X: pd.DataFrame, members: bool) -> pd.DataFrame:
        """``post_id, split, popularity_score`` (+ one column per member with ``members``) of the stack inputs."""
        from popstack.stacking.stack import predict_stack, predict_stack_members

        ids = {KEY: table[KEY].to_numpy(), "split": table["split"].to_numpy()}
        if not members:
            return pd.DataFrame({**ids, "popularity_score": predict_stack(self.run.stack_model, X)})
        per = predict_stack_members(self.run.stack_model, X).reset_index(drop=True)
        return pd.concat([pd.DataFrame({**ids, "popularity_score": per.pop("blend").to_numpy()}), per], axis=1)

    def evaluate(self, posts: str | Path | pd.DataFrame, image_root: str | Path = ".",
                 work_dir: str | Path | None = None) -> pd.DataFrame:
        """A leaderboard on labelled posts (like AutoGluon's ``TabularPredictor.leaderboard``): SRC and MAE of every
        stack member and of the blend, best SRC first, columns ``member, src, mae, posts``.

        ``posts``: a DataFrame of posts with a ``label`` column (log-views; rows without a label are not scored), or
        a path in the form of the run's data source with labels (an SMPD directory's ``train_label.txt``, a
        table's label column). ``result.attrs["popstack"]`` is
        the prediction's metadata; ``result.attrs["predictions"]`` the per-post predictions with their labels.
        """
        from popstack.datamodules.schema import LABEL
        from popstack.stacking.metrics import scores

        if isinstance(posts, pd.DataFrame):
            if LABEL not in posts.columns:
                raise UserError(f"posts DataFrame: evaluate needs a {LABEL!r} column (log-views) to score against")
            labels = pd.Series(pd.to_numeric(posts[LABEL], errors="coerce").to_numpy(),
                               index=posts[KEY].astype(str).to_numpy())
        else:
            raw = Path(posts)
            if not raw.exists():
                raise UserError(f"raw posts not found: {raw} (expected {self.source.new_posts})")
            read = self.source.read(self.cfg.data, raw, labels=True)
            labels = pd.Series(read[LABEL].to_numpy(), index=read[KEY].astype(str).to_numpy())
        predicted = self.predict(posts, image_root=image_root, work_dir=work_dir, members=True)
        predicted[LABEL] = labels.reindex(predicted[KEY].astype(str)).to_numpy()
        scored = predicted[predicted[LABEL].notna()]
        if scored.empty:
            raise UserError("evaluate: none of the posts has a label to score against")
        y = scored[LABEL].to_numpy(dtype=np.float64)
        columns = {"blend": "popularity_score", **{c: c for c in predicted.columns
                                                   if c not in (KEY, "split", "popularity_score", LABEL)}}
        rows = [{"member": name, **scores(y, scored[col].to_numpy(dtype=np.float64)), "posts": len(scored)}
                for name, col in columns.items()]
        board = pd.DataFrame(rows).sort_values("src", ascending=False, kind="stable").reset_index(drop=True)
        board.attrs["popstack"] = predicted.attrs.get("popstack", {})
        board.attrs["predictions"] = predicted
        return board

    @classmethod
    def from_artifact(cls, artifact, root: str | Path | None = None, devices: int | None = None,
                      progress_bar: bool = True) -> "Predictor":
        """A Predictor from the ``predictor`` artifact a training run logged to W&B (``pipeline.tracking``).

        ``artifact``: its full name (``"<entity>/<project>/<group>-predictor:latest"``, downloaded with the W&B API
        into ``root``), a ``wandb.Artifact`` object (one logged or built in this process, offline included, is
        copied from its local files into ``root``), or the folder an artifact was downloaded to. ``root``
        defaults to a new temporary folder.
        """
        import shutil
        import tempfile

        if isinstance(artifact, (str, Path)) and Path(artifact).is_dir():
            return cls.from_run_dir(artifact, devices=devices, progress_bar=progress_bar)
        target = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="popstack-predictor-"))
        if isinstance(artifact, (str, Path)):
            import wandb

            try:
                artifact = wandb.Api().artifact(str(artifact), type="model")
            except (wandb.errors.CommError, ValueError) as err:
                raise UserError(f"W&B artifact {artifact}: {' '.join(str(err).split())}") from err
        local = {name: entry.local_path for name, entry in artifact.manifest.entries.items()}
        if local and all(p is not None and Path(p).is_file() for p in local.values()):
            for name, src in local.items():  # built or logged in this process: its files are here
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / name)
        else:
            artifact.download(root=str(target))
        return cls.from_run_dir(target, devices=devices, progress_bar=progress_bar)

    def _stack_inputs(self, posts: pd.DataFrame, work: RunLayout) -> pd.DataFrame:
        """The stacker's input columns for ``posts`` laid out in ``work`` (float32, rows in posts order)."""
        from popstack.features.build import transform_features
        from popstack.pipeline.neural import build_cache, neural_outputs
        from popstack.pipeline.stages.features import feature_config, standardised

        feats = transform_features(posts, self.state, feature_config(self.cfg), image_dir=work.shards)
        with atomic_path(work.tabular) as tmp:  # the other ranks wait for this file
            standardised(feats, self.scaler).to_parquet(tmp, index=False)
        build_cache(self.cfg, work, weights=self.weights, images=self.images)
        nf, preds = neural_outputs(self.cfg, work, self.run, self.extract_state, images=self.images)
        X = pd.concat([feats.reset_index(drop=True), nf.drop(columns=[KEY]), preds.drop(columns=[KEY])], axis=1)
        return X[self.columns].astype(np.float32)

    def _metadata(self, posts: pd.DataFrame, source: str) -> dict:
        """What the output's metadata records; every image missing is warned about loudly (scores then rest on
        text and metadata alone)."""
        not_ok = int((posts["image_status"] != IMAGE_OK).sum())
        meta = {"run_dir": str(self.run_dir), "source": source, "posts": len(posts), "images_not_ok": not_ok,
                "all_images_missing": bool(not_ok == len(posts))}
        if meta["all_images_missing"]:
            meta["warning"] = (f"none of the {len(posts)} images of {source} could be read: the predictions use "
                               f"no visual information (check the image paths)")
            log.warning("predict: %s", meta["warning"].upper())
        return meta
