"""Stage 3, neural: the embedding cache, then every enabled module trained on every fold (``pipeline.neural``).

Each module is trained once per fold of the shared fold assignment, so its predictions for labelled posts are
out-of-fold and line up with the stack's folds (the extract stage makes them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.distributed import topology, wait_for, wait_timeout
from pipeline.layout import RunLayout
from pipeline.manifest import StageResult, file_digest
from pipeline.neural import (
    MONITOR,
    build_cache,
    build_module,
    cache_datamodule,
    enabled_modules,
    shard_datamodule,
    trainer_cfg,
    uses_shards,
)
from pipeline.stages.base import StageContext, common_config, data_config
from pipeline.training import (
    KEY_FILE,
    finished_checkpoint,
    fit_resumable,
    read_done,
    recorded_key_is,
    result_trainer_args,
    start_fresh_unless,
    user_callbacks,
)

log = logging.getLogger("popstack")


def config(c: dict) -> dict:
    return {"backbone": c["backbone"], "model": c["model"], "data": data_config(c),
            "trainer": result_trainer_args(c["trainer"]), **common_config(c),
            **({"callbacks": c["callbacks"]} if c.get("callbacks") else {})}  # absent when none: old runs stay valid


def outside_inputs(cfg: DictConfig) -> dict:
    """What the frozen backbone's weights are made of: name, and the sha256 of a user file, the hub tag, or
    random init with the run's seed."""
    pre = cfg.backbone.pretrained
    source = f"sha256:{file_digest(Path(pre))}" if pre and Path(pre).is_file() else (pre or f"random:{cfg.seed}")
    return {"name": cfg.backbone.name, "weights": source}


def run(ctx: StageContext) -> StageResult:
    """Train every enabled module on every fold, on the embedding cache or over the shards (``uses_shards``).

    ``ctx.upstream``: content checksums of the run files this stage reads (``pipeline.manifest``); ``ctx.inputs``:
    the weights' fingerprint (``outside_inputs``, computed once for the stage hash: a user file is hashed once).
    The embedding cache and each fold's directory are keyed by them, by the fold assignment and the module's
    config, so nothing made from other inputs is reused."""
    cfg, layout, inputs, bb = ctx.cfg, ctx.layout, ctx.upstream, ctx.inputs
    cache_key = {"shards": inputs.get(RunLayout.shards), "posts": inputs.get(RunLayout.posts), "backbone": bb,
                 "token_len": int(cfg.backbone.token_len), "text_field": cfg.data.text_field,
                 "precision": str(cfg.trainer.precision)}
    build_cache(cfg, layout, key=cache_key)
    metrics = {}
    outputs = [RunLayout.embeddings]
    for name in enabled_modules(cfg):
        monitor, _ = MONITOR[name]
        for fold in range(int(cfg.n_folds)):
            out = layout.fold_dir(name, fold)
            key = {"data": inputs, "folds": inputs.get(RunLayout.folds), "fold": fold, "seed": int(cfg.seed) + fold,
                   "model": OmegaConf.to_container(cfg.model[name], resolve=True), "backbone": {
                       **bb, "trainable_last_blocks": int(cfg.backbone.trainable_last_blocks),
                       "token_len": int(cfg.backbone.token_len)},
                   "trainer": result_trainer_args(trainer_cfg(cfg))}
            if cfg.get("callbacks"):  # user callbacks change what a fit makes
                key["callbacks"] = OmegaConf.to_container(cfg.callbacks, resolve=True)
            train_fold(cfg, layout, name, fold, key)
            metrics[f"{name}/fold{fold}/{monitor}"] = read_done(out)["best_score"]
            outputs.append(layout.rel(out))
    return StageResult(outputs=outputs, metrics=metrics)


def train_fold(cfg: DictConfig, layout: RunLayout, name: str, fold: int, key: dict) -> None:
    """Fit module ``name`` on ``fold`` into its fold folder unless a finished fit made with ``key`` is there.

    Rank 0 alone clears a fold folder made from something else and records ``key``; the other ranks wait for it."""
    out = layout.fold_dir(name, fold)
    topo = topology()
    if topo.is_zero:
        start_fresh_unless(out, key)
    else:
        wait_for(lambda: recorded_key_is(out / KEY_FILE, key), f"{out / KEY_FILE} (keyed by rank 0)",
                 wait_timeout(cfg))
    if finished_checkpoint(out) is not None:
        return
    log.info("neural: training %s fold %d/%d", name, fold + 1, cfg.n_folds)
    torch.manual_seed(int(cfg.seed))  # one initialisation for every fold's model (training order: per fold)
    dm = cache_datamodule(cfg, layout, name, fold)
    module = build_module(cfg, layout, name, dm)
    data = shard_datamodule(cfg, layout, name, fold) if uses_shards(cfg, name) else dm
    monitor, mode = MONITOR[name]
    fit_resumable(module, data, out, key=key if topo.is_zero else None, trainer_cfg=trainer_cfg(cfg),
                  max_epochs=int(cfg.model[name].epochs), monitor=monitor, mode=mode,
                  seed=int(cfg.seed) + fold, wandb_prefix=f"{name}/fold{fold}",
                  progress_bar=bool(cfg.get("progress_bar", True)),
                  early_stopping_patience=cfg.model[name].get("early_stopping_patience"),
                  extra_callbacks=user_callbacks(cfg.get("callbacks")))
