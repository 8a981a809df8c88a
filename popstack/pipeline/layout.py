"""The one object that names the files and folders of a run directory.

    layout = RunLayout(run_dir)
    layout.posts                    # Path: <run>/posts.parquet
    RunLayout.posts                 # "posts.parquet": the same entry relative to the run (manifests record these)
    layout.fold_dir(name, 0)        # <run>/neural/<name>/fold0 (name: a registered neural module)

Every module that reads or writes a run directory goes through this class; no other module spells a run file's
name. ``predict.py`` lays new posts out in a work directory of the same shape (posts, folds, vocab, shards,
features, embeddings), so a ``RunLayout`` over that directory names its files too. Files inside a folder that a
room owns (the embedding cache's arrays, the feature state, the stacker's model files) are named by that room.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class _Entry:
    """A file or folder of the run directory: its name relative to the run on the class, its path on an instance."""

    def __init__(self, rel: str):
        self.rel = rel

    def __get__(self, layout: "RunLayout | None", owner: type | None = None):
        return self.rel if layout is None else layout.root / self.rel


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory (``root``); see the module docstring."""

    root: Path

    # run-level files
    config = _Entry("config.yaml")
    lock = _Entry(".lock")
    lock_held = _Entry(".lock.held")  # the run lock where the file system has no flock (pipeline.lock)
    manifests = _Entry("manifests")
    wandb = _Entry("wandb")
    wandb_run_ids = _Entry("wandb_run_ids.json")
    sweep_job = _Entry("sweep_job.json")  # a multirun job's line of the sweep's comparison table
    # prepare
    posts = _Entry("posts.parquet")
    vocab = _Entry("vocab.json")
    folds = _Entry("folds.parquet")
    shards = _Entry("shards")
    # features
    features = _Entry("features")
    feature_table = _Entry("features/features.parquet")
    feature_schema = _Entry("features/schema.json")
    feature_state = _Entry("features/state")
    tabular = _Entry("features/tabular.parquet")
    tabular_scaler = _Entry("features/tabular_standardiser.npz")
    # neural
    embeddings = _Entry("embeddings")
    embeddings_key = _Entry("embeddings/key.json")
    backbone = _Entry("embeddings/backbone.pt")
    neural = _Entry("neural")
    # extract
    neural_features = _Entry("neural/features.parquet")
    neural_predictions = _Entry("neural/predictions.parquet")
    neural_families = _Entry("neural/families.json")
    extract_state = _Entry("neural/pca.npz")
    class_loss = _Entry("neural/class_loss.parquet")
    fold_predictions = _Entry("neural/fold_predictions.parquet")  # each fold model's predictions of unlabelled posts
    # stack
    stack = _Entry("stack")
    stack_model = _Entry("stack/model")
    stack_predictions = _Entry("stack/predictions.parquet")
    stack_scores = _Entry("stack/scores.csv")
    pseudo_rounds = _Entry("stack/pseudo_rounds.csv")
    blend_weights = _Entry("stack/blend_weights.csv")
    importance = _Entry("stack/importance.csv")
    ablation = _Entry("stack/ablation.csv")
    dropped_members = _Entry("stack/dropped.csv")
    refit = _Entry("stack/refit.csv")
    # report
    predictions = _Entry("predictions.parquet")
    submission = _Entry("submission.json")
    report = _Entry("report.md")
    distribution_plot = _Entry("prediction_distribution.png")
    importance_plot = _Entry("feature_importance.png")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def rel(self, path: Path) -> str:
        """``path`` (inside the run) relative to the run directory, as the manifests record it."""
        return Path(path).relative_to(self.root).as_posix()

    def module_dir(self, module: str) -> Path:
        """``neural/<module>``: the fold folders of one neural module."""
        return self.neural / module

    def fold_dir(self, module: str, fold: int) -> Path:
        """``neural/<module>/fold<k>``: one fit (``pipeline.training`` names the files inside)."""
        return self.module_dir(module) / f"fold{fold}"

    def predict_dir(self, module: str) -> Path:
        """``neural/<module>/predict``: the per-rank prediction files of one module's checkpoints."""
        return self.module_dir(module) / "predict"

    def manifest(self, stage: str) -> Path:
        """``manifests/<stage>.json`` (``pipeline.manifest``)."""
        return self.manifests / f"{stage}.json"

    def launch_record(self, launch_id: str) -> Path:
        """``manifests/.launch-<id>.json``: the stage hashes rank 0 recorded in one launch."""
        safe = "".join(c if c.isalnum() else "-" for c in launch_id)
        return self.manifests / f".launch-{safe}.json"
