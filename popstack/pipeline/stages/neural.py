"""Stage 3, neural: the embedding cache, then every enabled module trained on every fold (``pipeline.neural``).

Each module is trained once per fold of the shared fold assignment, so its predictions for labelled posts are
out-of-fold and line up with the stack's folds (the extract stage makes them). A module with an F model
(``spec.f_model``, the prompt/prototype module) also trains that one model (every post with a known class: no
popularity label, no fold), which gives every post's F vector; without fold models (``spec.fold_models``) that is
all it trains.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from popstack.pipeline.distributed import (
    Topology,
    planned_world_size,
    start_lightning_processes,
    topology,
    wait_for,
    wait_timeout,
)
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import StageResult, file_digest
from popstack.pipeline.neural import (
    build_cache,
    build_module,
    cache_datamodule,
    class_count,
    class_skipped,
    enabled_modules,
    f_model_changes,
    f_model_dir,
    has_f_model,
    has_fold_models,
    image_skipped,
    image_token_grid,
    images_readable,
    model_identity,
    monitor_of,
    shard_datamodule,
    trainer_cfg,
    uses_shards,
)
from popstack.pipeline.stages.base import StageContext, common_config, data_config
from popstack.pipeline.training import (
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
    """What the stage's outputs depend on (of ``model``, the enabled modules' sections: ``model_identity``);
    ``world_size`` (devices x nodes, ``planned_world_size``) too, since ``model.<name>.batch_size`` is the global
    batch split across the devices: another world size retrains."""
    return {"backbone": c["backbone"], "model": model_identity(c["model"]), "data": data_config(c),
            "trainer": result_trainer_args(c["trainer"]), "world_size": planned_world_size(c["trainer"]),
            **common_config(c),
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
    images = images_readable(layout)
    if not images and topology().is_zero:
        skipped = "; ".join(f"{n} skipped ({why})" for n, why in image_skipped(cfg).items())
        log.info("neural: no post has a readable image; the embedding cache skips the image tower%s",
                 f"; {skipped}" if skipped else "")
    cache_key = {"shards": inputs.get(RunLayout.shards), "posts": inputs.get(RunLayout.posts), "backbone": bb,
                 "token_len": int(cfg.backbone.token_len), "text_field": cfg.data.text_field,
                 "precision": str(cfg.trainer.precision), "image_token_grid": image_token_grid(cfg, images),
                 **({} if images else {"images": False})}  # a cache with images keeps its key
    start_lightning_processes(trainer_cfg(cfg))  # Lightning's launcher: the other ranks share the cache work
    build_cache(cfg, layout, key=cache_key, images=images)
    metrics = {}
    outputs = [RunLayout.embeddings]
    classes = class_count(layout)
    if topology().is_zero and class_skipped(cfg, classes):
        log.info("neural: the posts have %d subcategor%s; %s skipped (a classification needs more)",
                 classes, "y" if classes == 1 else "ies", ", ".join(class_skipped(cfg, classes)))
    for name in enabled_modules(cfg, images, classes):
        monitor, _ = monitor_of(name)
        model_key = module_key(cfg, bb, name)
        if has_f_model(name):
            # the F model reads no label and no fold: the fold assignment is not part of its key
            key = {"data": {k: v for k, v in inputs.items() if k != RunLayout.folds}, "seed": int(cfg.seed),
                   "f_model": True, **model_key}
            train_f_model(cfg, layout, name, key)
            outputs.append(layout.rel(f_model_dir(layout, name)))
        if not has_fold_models(cfg, name):
            continue
        for fold in range(int(cfg.n_folds)):
            out = layout.fold_dir(name, fold)
            train_fold(cfg, layout, name, fold, fold_key(cfg, inputs, bb, name, fold))
            metrics[f"{name}/fold{fold}/{monitor}"] = read_done(out)["best_score"]
            outputs.append(layout.rel(out))
    return StageResult(outputs=outputs, metrics=metrics)


def train_f_model(cfg: DictConfig, layout: RunLayout, name: str, key: dict) -> None:
    """Fit module ``name``'s one F model (its spec's ``f_model`` changes, e.g. no popularity head; every post
    with a known class, no validation:
    the last epoch's weights, as CMPA-DGPL §4.1.3 saves the model after training) unless a finished fit made with
    ``key`` is there. Over the shards (``uses_shards``) it trains on the labelled posts of every fold."""
    out = f_model_dir(layout, name)
    topo = topology()
    if _finished_with_key(cfg, out, key, topo):
        return
    log.info("neural: training the %s F model (classification only, every post with a known class)", name)
    torch.manual_seed(int(cfg.seed))
    dm = cache_datamodule(cfg, layout, name, None, all_posts=True)
    module = build_module(cfg, layout, name, dm, **f_model_changes(name))
    data = shard_datamodule(cfg, layout, name, None) if uses_shards(cfg, name) else dm
    fit_resumable(module, data, out, key=key if topo.is_zero else None, trainer_cfg=trainer_cfg(cfg),
                  max_epochs=int(cfg.model[name].epochs), monitor=None, mode="min", seed=int(cfg.seed),
                  wandb_prefix=f"{name}/features", progress_bar=bool(cfg.progress_bar))


def _finished_with_key(cfg: DictConfig, out: Path, key: dict, topo: Topology) -> bool:
    """Rank 0 clears a fit folder made from something else and records ``key`` (the other ranks wait for it);
    whether a finished fit made with ``key`` is there."""
    if topo.is_zero:
        start_fresh_unless(out, key)
    else:
        wait_for(lambda: recorded_key_is(out / KEY_FILE, key), f"{out / KEY_FILE} (keyed by rank 0)",
                 wait_timeout(cfg))
    return finished_checkpoint(out) is not None


def fold_key(cfg: DictConfig, inputs: dict, backbone: dict, name: str, fold: int) -> dict:
    """What fold ``fold`` of module ``name`` is made of (its ``key.json``): the stage's input checksums, the fold
    assignment, seed, module config, backbone, the trainer keys that change results and the world size (each device
    trains on its share of the global batch: a fold trained on 1 device is not reused on 8)."""
    return {"data": inputs, "folds": inputs.get(RunLayout.folds), "fold": fold, "seed": int(cfg.seed) + fold,
            **module_key(cfg, backbone, name)}


def module_key(cfg: DictConfig, backbone: dict, name: str) -> dict:
    """The part of a fit's key that is not data: module config, backbone, the trainer keys that change results, the
    world size and the user's callbacks (when any: they change what a fit makes)."""
    return {"model": OmegaConf.to_container(cfg.model[name], resolve=True), "backbone": {
        **backbone, "trainable_last_blocks": int(cfg.backbone.trainable_last_blocks),
        "token_len": int(cfg.backbone.token_len)},
        "trainer": result_trainer_args(trainer_cfg(cfg)), "world_size": planned_world_size(cfg.trainer),
        **({"callbacks": OmegaConf.to_container(cfg.callbacks, resolve=True)} if cfg.callbacks else {})}


def train_fold(cfg: DictConfig, layout: RunLayout, name: str, fold: int, key: dict) -> None:
    """Fit module ``name`` on ``fold`` into its fold folder unless a finished fit made with ``key`` is there.

    Rank 0 alone clears a fold folder made from something else and records ``key``; the other ranks wait for it."""
    out = layout.fold_dir(name, fold)
    topo = topology()
    if _finished_with_key(cfg, out, key, topo):
        return
    log.info("neural: training %s fold %d/%d", name, fold + 1, cfg.n_folds)
    torch.manual_seed(int(cfg.seed))  # one initialisation for every fold's model (training order: per fold)
    dm = cache_datamodule(cfg, layout, name, fold)
    module = build_module(cfg, layout, name, dm)
    data = shard_datamodule(cfg, layout, name, fold) if uses_shards(cfg, name) else dm
    monitor, mode = monitor_of(name)
    fit_resumable(module, data, out, key=key if topo.is_zero else None, trainer_cfg=trainer_cfg(cfg),
                  max_epochs=int(cfg.model[name].epochs), monitor=monitor, mode=mode,
                  seed=int(cfg.seed) + fold, wandb_prefix=f"{name}/fold{fold}",
                  progress_bar=bool(cfg.progress_bar),
                  early_stopping_patience=cfg.model[name].early_stopping_patience,
                  extra_callbacks=user_callbacks(cfg.callbacks))
