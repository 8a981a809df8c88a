"""The neural modules of stages 3 and 4 (``pipeline.stages.neural`` trains, ``pipeline.stages.extract`` extracts)
and of ``predict.py``: the embedding cache, data modules, module construction, checkpoints, fold predictions and
the F vector.

Modules: the registered ones (``lightning_modules.registry``; each is a section of ``cfg.model``). This file names
none: it reads each module's ``ModuleSpec`` (what it reads from the cache, what it monitors, what it emits, how it
is built). A module with fold models is trained once per fold of the shared fold assignment, so its predictions
for labelled posts are out-of-fold and line up with the stack's folds; a module with an F model (``spec.f_model``)
also trains one model on every post with a known class (``f_checkpoint``), the source of every post's F vector.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from popstack.datamodules.atomic import atomic_path, atomic_write_json
from popstack.datamodules.cached import EmbeddingDataModule, load_embedding_cache
from popstack.datamodules.cores import loader_workers
from popstack.datamodules.folds import read_folds
from popstack.datamodules.popularity import PopularityDataModule
from popstack.datamodules.schema import KEY, NO_FOLD, any_image_readable
from popstack.datamodules.shards import (
    Collate,
    SampleDecoder,
    make_eval_pipeline,
    make_loader,
    shard_counts,
    shard_urls,
)
from popstack.features.crossmodal import crossmodal_features
from popstack.features.families import NEURAL_TEXT, VISUAL
from popstack.lightning_modules.backbone import load_backbone, model_image_size, token_grid
from popstack.lightning_modules.embed import (
    RANK_DONE,
    RANK_PART,
    allocate_cache,
    encode_into,
    finish_cache,
    merge_rank_parts,
    partial_dir,
)
from popstack.lightning_modules.extract import KeyedPredictionWriter, merge_rank_outputs, oof_and_test
from popstack.lightning_modules.registry import INPUTS, BuildContext, module_spec, module_specs
from popstack.pipeline.distributed import rank_device, topology, wait_for, wait_timeout
from popstack.pipeline.errors import UserError
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.training import DONE, finished_checkpoint, recorded_key_is

log = logging.getLogger("popstack")

#: F-vector blocks (paper eq. 11, named after its symbols) and the family each joins in the stack. f_I, f_T come
#: from a module's F model when one runs (its CLIP, tuned where it is tuned), else from the embedding cache; the
#: others from the F model (its spec's ``f_blocks``). s is the tabular table.
CLIP_BLOCKS = {"f_i": "image_emb", "f_t": "text_emb"}  # block -> embedding-cache array
#: The cache blocks that are the image alone (left out without images, like the modules' ``image_f_blocks``).
IMAGE_CLIP_BLOCKS = ("f_i",)
F_BLOCKS = {"f_i": VISUAL, "f_t": NEURAL_TEXT,
            **{b: family for spec in module_specs().values() for b, family in spec.f_blocks.items()
               if b not in CLIP_BLOCKS}}
#: A module's one F model (``spec.f_model``): trained on every post with a known class, no label, no fold.
F_MODEL = "features"


def loader_workers_of(cfg: DictConfig, alone: bool = False) -> int:
    """Loader worker processes per rank: ``data.num_workers``, where ``auto`` is one per core of this rank less
    one (``datamodules.cores.loader_workers``; the ranks of a node are ``trainer.devices``, or just this process
    when it runs ``alone``, e.g. rank 0 building the cache before Lightning's launcher starts the others)."""
    devices = cfg.trainer.devices
    if alone:
        per_node = 1
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    elif cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() and str(devices) in (
            "auto", "-1"):
        per_node = torch.cuda.device_count()
    else:
        per_node = 1
    return loader_workers(cfg.data.num_workers, per_node)


def trainer_cfg(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def images_readable(layout: RunLayout) -> bool:
    """Whether the posts laid out in ``layout`` (a training run) have a readable image: the one test the features
    stage applies too (``datamodules.schema.any_image_readable``). ``Predictor`` takes the training run's decision
    from its feature state instead (``features.build.images_readable``)."""
    import pyarrow.parquet as pq

    columns = ["image_status"] if "image_status" in pq.read_schema(layout.posts).names else []
    return any_image_readable(pd.read_parquet(layout.posts, columns=columns))


def build_cache(cfg: DictConfig, layout: RunLayout, weights: str | None = None, key: dict | None = None,
                images: bool = True) -> Path:
    """Encode every post once with the frozen backbone, split across ranks; skipped when the cache exists and was
    built with ``key`` (the shards, posts and backbone it encodes; None at inference, where the work directory is
    new).

    Each of the ``world_size`` processes (``pipeline.distributed.topology``) encodes its share of the shards
    (``make_eval_pipeline``: shard ``i`` goes to rank ``i % world_size``) into arrays of its own,
    ``embeddings.partial/rank<r>/`` (no file is written by two ranks), and lists the post ids it wrote in
    ``rank<r>.done.json``; rank 0 checks that every post was written exactly once, copies the parts into the
    final arrays by post id (``merge_rank_parts``) and renames the folder (with
    ``key.json`` and, when training, the run's copy of the weights, ``RunLayout.backbone``) to ``embeddings``;
    the other ranks wait for that. Without a process group yet, the ranks meet through files, each marked with the
    launch id so files of an earlier, interrupted launch are never mistaken for this one's.

    ``weights``: CLIP weights file to use instead of ``cfg.backbone.pretrained`` (inference uses the run's).
    ``images`` False (no readable image in the training run): the image tower never runs, ``image_emb`` is zeros
    and no patch tokens are cached (``lightning_modules.embed``).
    """
    cache, key_file = layout.embeddings, layout.embeddings_key
    ready = (cache / "post_ids.json").is_file() and (recorded_key_is(key_file, key) if key else not key_file.exists())
    if ready and (weights is not None or layout.backbone.is_file()):
        return cache
    topo = topology()
    timeout = wait_timeout(cfg)
    tmp = partial_dir(cache)
    ready = tmp / "allocated.json"
    torch.manual_seed(int(cfg.seed))
    bb = load_backbone(cfg.backbone.name, weights or cfg.backbone.pretrained)
    grid = image_token_grid(cfg, images)
    posts = pd.read_parquet(layout.posts, columns=[KEY, "split"])
    post_ids = posts[KEY].tolist()
    positions = min(int(cfg.backbone.token_len), bb.context_length)
    image_positions = token_grid(bb.model, grid) ** 2 if grid else 0
    if topo.is_zero:
        if tmp.exists():  # left by an interrupted launch (its rank parts included, however many ranks it had)
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        atomic_write_json(ready, {"launch": topo.launch_id})
    else:
        wait_for(lambda: _launch_file(ready, topo.launch_id), f"{ready} (cache folder made by rank 0)", timeout)
    splits = [s for s in ("train", "test") if (posts.split == s).any()]
    mine = sum(shard_counts(layout.shards, splits)[topo.rank::topo.world_size])  # this rank's shards' posts
    loader = make_loader(make_eval_pipeline(
        shard_urls(layout.shards, splits), decoder=SampleDecoder(bb.image_size, cfg.data.text_field),
        collate=Collate(bb.tokenizer), batch_size=int(cfg.backbone.embed_batch_size),
        rank=topo.rank, world_size=topo.world_size,
    ), loader_workers_of(cfg, alone=topo.world_size == 1))
    device = rank_device(cfg.trainer.accelerator, cfg.trainer.devices)  # this rank's GPU, not GPU 0
    amp = torch.bfloat16 if str(cfg.trainer.precision).startswith("bf16") and device.type == "cuda" else None
    alone = topo.world_size == 1  # one process writes the final arrays by post id at once (no copy to merge)
    part = allocate_cache(tmp if alone else tmp / RANK_PART.format(rank=topo.rank), len(post_ids) if alone else mine,
                          bb.embed_dim, positions, image_positions)
    written = encode_into(bb.model, loader, part, {p: i for i, p in enumerate(post_ids)} if alone else None,
                          token_len=int(cfg.backbone.token_len), device=device, autocast_dtype=amp,
                          progress=topo.is_zero and bool(cfg.progress_bar), image_grid=grid,
                          images=images)
    log.info("embedding cache: rank %d of %d encoded %d posts", topo.rank, topo.world_size, len(written))
    atomic_write_json(tmp / RANK_DONE.format(rank=topo.rank), {"launch": topo.launch_id, "post_ids": written})
    if not topo.is_zero:
        merged = (lambda: recorded_key_is(key_file, key)) if key else (lambda: (cache / "post_ids.json").is_file())
        wait_for(merged, f"{cache} (merged by rank 0)", timeout)
        return cache
    parts = [wait_for(lambda r=r: _launch_file(tmp / RANK_DONE.format(rank=r), topo.launch_id),
                      f"{tmp / RANK_DONE.format(rank=r)} (rank {r}'s share of the cache)", timeout)["post_ids"]
             for r in range(topo.world_size)]
    if weights is None:  # training: the run keeps its own copy of the weights it encoded with
        # renamed into place with the folder
        torch.save(bb.model.cpu().state_dict(), tmp / layout.backbone.relative_to(cache))
    if key is not None:
        atomic_write_json(tmp / key_file.relative_to(cache), key)
    ready.unlink()
    if not alone:
        merge_rank_parts(tmp, post_ids, parts, bb.embed_dim, positions, image_positions)
    return finish_cache(tmp, cache, post_ids, parts)


def image_token_grid(cfg: DictConfig, images: bool = True) -> int:
    """The patch-token grid the embedding cache holds: ``backbone.image_token_grid`` when an enabled module reads
    CLIP's patch tokens (``spec.patch_tokens``), else 0 (no patch tokens cached; also without images, where such
    a module is skipped)."""
    readers = [n for n in enabled_modules(cfg, images) if module_spec(n).patch_tokens]
    if not readers:
        return 0
    grid = int(cfg.backbone.image_token_grid)
    if grid < 1:
        raise UserError(f"model.{readers[0]} attends over CLIP's patch tokens: backbone.image_token_grid must be at "
                        f"least 1 (got {grid})")
    return grid


def model_identity(model: dict) -> dict:
    """The ``model`` section (plain dict) without the sections of disabled modules: what the neural and extract
    stages' outputs depend on. A module switched off, or a new module registered off, changes no stage hash, so
    finished runs stay valid when a module file is added."""
    specs = module_specs()
    return {k: v for k, v in model.items() if k not in specs or v["enabled"]}


def _launch_file(path: Path, launch_id: str) -> dict | None:
    """The JSON at ``path`` when it was written by this launch (its ``launch`` field), else None."""
    try:
        payload = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return payload if payload.get("launch") == launch_id else None


def module_config(cfg: DictConfig, name: str, **changes):
    """Module ``name``'s typed config (its spec's dataclass) from the composed ``model.<name>`` section."""
    return module_spec(name).config_of(OmegaConf.to_container(cfg.model[name], resolve=True), **changes)


def _tabular_path(cfg: DictConfig, layout: RunLayout, name: str) -> str | None:
    """The standardised tabular matrix when module ``name`` reads it (``spec.reads_tabular``), else None."""
    return str(layout.tabular) if module_spec(name).reads_tabular(module_config(cfg, name)) else None


def cache_datamodule(cfg: DictConfig, layout: RunLayout, name: str, fold: int | None,
                     all_posts: bool = False) -> EmbeddingDataModule:
    """Batches of the frozen-embedding cache for module ``name`` (``model.<name>.batch_size``: the global batch,
    divided across the devices).
    ``all_posts``: train on every post with a known class, labelled or not (the F model)."""
    m = cfg.model[name]
    return EmbeddingDataModule(
        str(layout.embeddings), str(layout.posts), str(layout.folds), str(layout.vocab), fold=fold, all_posts=all_posts,
        batch_size=int(m.batch_size), num_workers=loader_workers_of(cfg),
        fields=module_spec(name).cache_fields, tabular_path=_tabular_path(cfg, layout, name),
        seed=int(cfg.seed) + (fold or 0),
    )


def uses_shards(cfg: DictConfig, name: str) -> bool:
    """Whether module ``name`` trains (and predicts) on images read from the WebDataset shards rather than on the
    frozen-embedding cache: when CLIP is partly trainable (``backbone.trainable_last_blocks > 0``, the cache would
    hold stale features) or ``model.<name>.input: images`` asks for it. The cache stays the fast default."""
    kind = str(cfg.model[name].input)
    if kind not in INPUTS:
        raise UserError(f"model.{name}.input must be one of {list(INPUTS)}, got {kind!r}")
    return int(cfg.backbone.trainable_last_blocks) > 0 or kind == "images"


def shard_datamodule(cfg: DictConfig, layout: RunLayout, name: str, fold: int | None) -> PopularityDataModule:
    """Raw image + token batches of the run's shards for module ``name`` (``model.<name>.batch_size``: the global
    batch, as on the cached path): every training post once per epoch with equal batches per rank, epoch-seeded;
    every post once to predict. ``fold`` None: all labelled posts train (and prediction reads whichever splits have
    shards)."""
    m = cfg.model[name]
    shards = layout.shards
    return PopularityDataModule(
        str(shards), str(layout.folds), batch_size=int(m.batch_size),
        num_workers=loader_workers_of(cfg), image_size=model_image_size(cfg.backbone.name),
        text_field=cfg.data.text_field, model_name=cfg.backbone.name, fold=fold, seed=int(cfg.seed) + (fold or 0),
        predict_splits=tuple(s for s in ("train", "test") if (shards / f"{s}-index.json").is_file()),
        tabular_path=_tabular_path(cfg, layout, name),
    )


def build_module(cfg: DictConfig, layout: RunLayout, name: str, dm: EmbeddingDataModule, **changes):
    """The module ``name`` for one fold, built by its spec (``spec.build(config, context)``) from its typed config
    (``changes`` replace config values: the F model's ``spec.f_model``) and the fold's data facts: label
    statistics, CLIP width, tabular width, classes, the cache (prototypes come from it).

    A module with its own CLIP copy (one trained over shards, ``uses_shards``, or one that always has it) gets
    the run's weights (the last ``backbone.trainable_last_blocks`` blocks trainable) and encodes raw batches
    without the image tower when the run has no readable image.
    """
    spec = module_spec(name)
    y = dm.meta.label.to_numpy()[dm.train_idx]
    y = y[~np.isnan(y)]  # the F model trains on unlabelled posts too (it reads no label)
    cache = dm.cache
    ctx = BuildContext(
        backbone_name=cfg.backbone.name, trainable_last_blocks=int(cfg.backbone.trainable_last_blocks),
        token_len=int(cfg.backbone.token_len), image_token_grid=image_token_grid(cfg),
        raw_batches=uses_shards(cfg, name), embed_dim=int(cache["image_emb"].shape[1]), tabular_dim=dm.tabular_dim,
        class_names=tuple(json.loads(layout.vocab.read_text())["subcategory"]),
        target_mean=float(np.mean(y)) if len(y) else 0.0, target_std=float(np.std(y) or 1.0) if len(y) else 1.0,
        seed=int(cfg.seed), cache=cache, train_idx=dm.train_idx, subcategory_id=dm.meta.subcategory_id.to_numpy(),
        posts=lambda columns: pd.read_parquet(layout.posts, columns=columns))
    module = spec.build(module_config(cfg, name, **changes), ctx)
    if hasattr(module, "clip"):
        _load_run_clip(module, layout)
        module.encode_images = images_readable(layout)  # raw batches: no image tower without images
    return module


def _load_run_clip(module, layout: RunLayout) -> None:
    """Load the run's CLIP weights into ``module.clip`` (built with ``backbone_pretrained=None``), so no weights
    path, absolute or not, lands in the checkpoint's hyperparameters: checkpoints carry the weights themselves."""
    module.clip.load_state_dict(torch.load(layout.backbone, map_location="cpu", weights_only=True))


def enabled_modules(cfg: DictConfig, images: bool = True, classes: int | None = None) -> list[str]:
    """The modules that run: enabled in ``cfg.model``, less, when the dataset has no readable image (``images``
    False), those whose input is essentially the image (their class's ``needs_images``, see ``image_skipped``), and,
    when the run's posts have ``classes`` subcategories (``class_count``; None: not known here), those whose
    classification needs more (``min_classes``, see ``class_skipped``)."""
    specs = module_specs()
    names = [n for n in specs if n in cfg.model and cfg.model[n].enabled]
    unknown = [n for n in cfg.model if n not in specs and n != "extract"]
    if unknown:
        raise ValueError(f"unknown model section(s) {unknown}; modules are {list(specs)}")
    names = names if images else [n for n in names if not specs[n].needs_images]
    return names if classes is None else [n for n in names if classes >= specs[n].min_classes]


def class_count(layout: RunLayout) -> int:
    """The number of subcategories of a training run's posts (its ``vocab.json``)."""
    return len(json.loads(layout.vocab.read_text())["subcategory"])


def class_skipped(cfg: DictConfig, classes: int) -> list[str]:
    """The enabled modules a run with ``classes`` subcategories skips (their classification needs more)."""
    return [n for n in enabled_modules(cfg) if classes < module_spec(n).min_classes]


def image_skipped(cfg: DictConfig) -> dict[str, str]:
    """{enabled module: why} for the modules a dataset without a readable image skips (``needs_images``)."""
    return {n: module_spec(n).needs_images for n in enabled_modules(cfg) if module_spec(n).needs_images}


def image_f_blocks(cfg: DictConfig) -> set[str]:
    """The F blocks that are the image alone (constant without images): the cache's ``IMAGE_CLIP_BLOCKS`` and the
    enabled modules' ``image_f_blocks``."""
    return {*IMAGE_CLIP_BLOCKS, *(b for n in enabled_modules(cfg) for b in module_spec(n).image_f_blocks)}


def load_module(name: str, checkpoint: str | Path):
    """A trained module from its checkpoint alone (CLIP weights come from the checkpoint itself)."""
    cls = module_spec(name).module
    try:
        return cls.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=True,
                                        backbone_pretrained=None)
    except FileNotFoundError as err:
        raise UserError(f"checkpoint not found: {checkpoint}") from err
    except Exception as err:  # torch raises several types for a damaged file
        raise UserError(f"cannot load checkpoint {checkpoint}: {type(err).__name__}: {err}") from err


def predict_frames(cfg: DictConfig, dm: EmbeddingDataModule | PopularityDataModule, work: Path,
                   ckpts: dict[int, Path], name: str, post_ids: list[str],
                   images: bool = True) -> dict[int, pd.DataFrame]:
    """Every post's outputs from each fold's checkpoint (``trainer.predict`` + keyed writer, merged by id).

    On many devices each rank predicts its share of the posts (the loader is made by the Trainer, once the ranks
    are known) and writes ``work/fold<k>/rank<r>.parquet``; ``work`` must be the same folder on every rank (the
    run directory, or ``pipeline.distributed.shared_tmpdir`` for ``predict.py``). After a barrier every rank reads
    all rank files, joined by post id (``merge_rank_outputs``: every post exactly once). ``images`` False: raw
    batches are encoded without the image tower (the run had no readable image).
    """
    from popstack.pipeline.training import make_trainer

    frames = {}
    t = trainer_cfg(cfg)
    for fold, ckpt in ckpts.items():
        module = load_module(name, ckpt)
        module.encode_images = images
        out = work / f"fold{fold}"
        writer = KeyedPredictionWriter(out)
        trainer = make_trainer(t, logger=False, callbacks=[writer], enable_progress_bar=bool(cfg.progress_bar))
        trainer.predict(module, datamodule=dm, return_predictions=False)
        trainer.strategy.barrier()  # every rank's file is written before anyone merges
        frames[fold] = merge_rank_outputs(out, post_ids, trainer.world_size).drop(columns=["class_pred"],
                                                                                  errors="ignore")
    return frames


def fit_pca_blocks(frame: pd.DataFrame, labelled: np.ndarray, dim: int, state: dict) -> pd.DataFrame:
    """PCA (fitted on labelled rows) of each wide F block to ``dim`` columns; 0 keeps the raw columns."""
    from sklearn.decomposition import PCA

    blocks = []
    for block, family in F_BLOCKS.items():
        cols = [c for c in frame.columns if c.startswith(f"{block}_")]
        if not cols:
            continue
        x = frame[cols].to_numpy(dtype=np.float32)
        if dim and len(cols) > dim:
            if block not in state:
                pca = PCA(n_components=dim, random_state=0).fit(x[labelled])
                state[block] = (pca.mean_.astype(np.float32), pca.components_.astype(np.float32))
            mean, comps = state[block]
            x = (x - mean) @ comps.T
        names = [f"{family}__{block}_{j:03d}" for j in range(x.shape[1])]
        blocks.append(pd.DataFrame(x.astype(np.float32), columns=names))
    return pd.concat(blocks, axis=1)


def has_fold_models(cfg: DictConfig, name: str) -> bool:
    """Whether module ``name`` is trained per fold (``spec.fold_models`` of its config; e.g. not a module whose
    only outputs come from its F model)."""
    return bool(module_spec(name).fold_models(module_config(cfg, name)))


def has_f_model(name: str) -> bool:
    """Whether module ``name`` trains one F model on every post (``spec.f_model``): the source of the F vector."""
    return module_spec(name).f_model is not None


def f_model_changes(name: str) -> dict:
    """The config changes of module ``name``'s F model (e.g. no popularity head)."""
    return dict(module_spec(name).f_model or {})


def monitor_of(name: str) -> tuple[str, str]:
    """(metric, mode) the fold models of module ``name`` keep their best checkpoint on."""
    spec = module_spec(name)
    return spec.monitor, spec.mode


def f_model_dir(layout: RunLayout, name: str) -> Path:
    """``neural/<module>/features``: a module's one F model (``pipeline.training`` files)."""
    return layout.module_dir(name) / F_MODEL


def f_checkpoint(layout: RunLayout, name: str) -> Path:
    """The F model's checkpoint; raises ``FileNotFoundError`` when it has not finished training."""
    best = finished_checkpoint(f_model_dir(layout, name))
    if best is None:
        raise FileNotFoundError(f"{f_model_dir(layout, name) / DONE}: the {name} F model has not finished training")
    return best


def checkpoints(cfg: DictConfig, layout: RunLayout, name: str) -> dict[int, Path]:
    """The best checkpoint of each fold of module ``name``."""
    out = {}
    for fold in range(int(cfg.n_folds)):
        fold_dir = layout.fold_dir(name, fold)
        best = finished_checkpoint(fold_dir)
        if best is None:
            raise FileNotFoundError(f"{fold_dir / DONE}: {name} fold {fold} has not finished training")
        out[fold] = best
    return out


def _block_frame(cache, blocks: dict[str, str]) -> pd.DataFrame:
    """{block: cache array} -> columns ``<block>_<j>``."""
    return pd.concat([pd.DataFrame(np.asarray(cache[a]), columns=[f"{b}_{j:03d}" for j in range(cache[a].shape[1])])
                      for b, a in blocks.items()], axis=1)


def neural_outputs(cfg: DictConfig, data: RunLayout, run: RunLayout, state: dict,
                   extras: dict | None = None, images: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Neural features (the F vector blocks of eq. 11, PCA-reduced, + the cross-modal cosine) and predictions of
    every post laid out in ``data`` (posts, folds, vocab, embeddings, features), with the checkpoints of ``run``.

    F is leak-free and the same space for every post: its prompt/prototype blocks (and f_I, f_T) come from the one
    classification-only F model (``f_checkpoint``: no popularity label, trained on every post with a known class),
    so a post's row does not depend on its fold; without the module, f_I and f_T are the embedding cache.
    Predictions: posts with a fold get their fold model's (out-of-fold), the others (test, new and held-back posts)
    the mean over fold models. ``state`` (PCA bases) is filled on the training run and reused as is for new posts.
    A module without a popularity head adds no prediction column. ``extras``, when given, receives
    ``fold_predictions`` ({prediction column: {fold: (unlabelled posts,) that fold model's predictions}}:
    pseudo-labels of fold k read fold k's model only, ``stacking.stack.fold_pseudo_labels``) and ``class_loss``:
    (n,) per-post classification loss of the F model (the subcategory is not a popularity label), or nothing.
    ``images`` False (the training run had no readable image): the image-only modules were not trained and are not
    read, and the F blocks that are the image alone (``image_f_blocks``) and the cross-modal cosine are left out.
    """
    folds = read_folds(data.folds)
    post_ids = folds[KEY].tolist()
    labelled = folds["fold"].to_numpy() != NO_FOLD
    cache = load_embedding_cache(data.embeddings)
    preds = pd.DataFrame({KEY: post_ids})
    dropped = set() if images else image_f_blocks(cfg)
    f_frame = _block_frame(cache, {b: a for b, a in CLIP_BLOCKS.items() if b not in dropped})
    for name in enabled_modules(cfg, images, class_count(run)):
        shards = uses_shards(cfg, name)
        dm = shard_datamodule(cfg, data, name, None) if shards else cache_datamodule(cfg, data, name, None)
        if has_f_model(name):
            f_out = predict_frames(cfg, dm, data.predict_dir(name), {F_MODEL: f_checkpoint(run, name)}, name,
                                   post_ids, images)[F_MODEL]
            cols = [c for c in f_out.columns if c.rsplit("_", 1)[0] in F_BLOCKS and c.rsplit("_", 1)[0] not in dropped]
            f_frame = f_out[cols].reset_index(drop=True)
            if extras is not None:
                extras["class_loss"] = f_out["class_loss"].to_numpy(dtype=np.float64)
        if not has_fold_models(cfg, name):
            continue
        frames = predict_frames(cfg, dm, data.predict_dir(name), checkpoints(cfg, run, name), name, post_ids,
                                images)
        frames = {k: f[[KEY, "prediction"]] for k, f in frames.items()}
        merged = oof_and_test(frames, folds)
        preds[f"pred_{name}"] = merged["prediction"].to_numpy(dtype=np.float32)
        if extras is not None:
            extras.setdefault("fold_predictions", {})[f"pred_{name}"] = unlabelled_by_fold(frames, folds)
    nf = fit_pca_blocks(f_frame, labelled, int(cfg.model.extract.pca_dim), state)
    if images:  # without images the image-text cosine is NaN for every post
        nf = pd.concat([nf, crossmodal_features(np.asarray(cache["image_emb"]), np.asarray(cache["text_emb"]),
                                                np.asarray(cache["has_image"]))], axis=1)
    nf.insert(0, KEY, post_ids)
    return nf, preds


def unlabelled_by_fold(frames: dict[int, pd.DataFrame], folds: pd.DataFrame) -> dict[int, np.ndarray]:
    """{fold k: fold k's model's ``prediction`` of each post without a fold, in posts order}."""
    rows = folds["fold"].to_numpy() == NO_FOLD
    order = folds[KEY].to_numpy()[rows]
    return {k: f.set_index(KEY).loc[order, "prediction"].to_numpy(dtype=np.float32) for k, f in frames.items()}


def save_extract_state(state: dict, path: Path) -> None:
    """The extract state (PCA bases ``{block: (mean, components)}``, and any per-fold pairs
    ``{name: {fold: (a, b)}}``) as one ``.npz``."""
    arrays = {}
    for key, value in state.items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for fold, (a, b) in pairs:
            name = key if fold is None else f"{key}/fold{fold}"
            arrays[f"{name}.0"], arrays[f"{name}.1"] = a, b
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_extract_state(path: Path) -> dict:
    """Inverse of ``save_extract_state``."""
    state: dict = {}
    with np.load(path, allow_pickle=False) as z:
        for name in sorted({k.rsplit(".", 1)[0] for k in z.files}):
            if f"{name}.0" not in z.files:
                raise ValueError(f"{path}: entry {name!r} is in an older layout (no '{name}.0'); rerun the extract "
                                 f"stage of that run")
            pair = (z[f"{name}.0"], z[f"{name}.1"])
            if "/fold" in name:
                key, fold = name.rsplit("/fold", 1)
                state.setdefault(key, {})[int(fold)] = pair
            else:
                state[name] = pair
    return state
