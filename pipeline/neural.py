"""Stages 3 and 4: the embedding cache, per-fold training of the neural modules, and extraction.

Models (``cfg.model.modules``): ``prompt_prototype`` (CMPA-DGPL), ``co_attention`` (HyperFusion co-attention MLP),
``hierarchical`` (CLIP hierarchical predictor). Each is trained once per fold of the shared fold assignment, so
its predictions for labelled posts are out-of-fold and line up with the stack's folds.
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

from datamodules.atomic import atomic_path, atomic_write_json
from datamodules.cached import EMBEDDING_FIELDS, EmbeddingDataModule, load_embedding_cache
from datamodules.folds import read_folds
from datamodules.popularity import PopularityDataModule
from datamodules.schema import KEY, LABEL, NO_FOLD
from datamodules.shards import Collate, SampleDecoder, make_eval_pipeline, make_loader, shard_urls
from features.crossmodal import crossmodal_features
from features.families import NEURAL_PRED, NEURAL_TEXT, PROMPT, VISUAL
from lightning_modules.backbone import load_backbone, model_image_size
from lightning_modules.embed import RANK_DONE, allocate_cache, encode_into, finish_cache, open_cache_arrays, partial_dir
from lightning_modules.extract import KeyedPredictionWriter, align_fold_outputs, merge_rank_outputs, oof_and_test
from lightning_modules.prompt_prototype_module import PromptPrototypeModule
from lightning_modules.prototypes import prototype_means, select_prototype_posts
from lightning_modules.regressors import CLIPHierarchicalPredictor, CoAttentionMLPModule
from pipeline.distributed import topology, wait_for, wait_timeout
from pipeline.errors import UserError
from pipeline.featurize import TABULAR
from pipeline.manifest import StageResult
from pipeline.training import (DONE, KEY_FILE, finished_checkpoint, fit_resumable, read_done, recorded_key_is,
                               result_trainer_args, start_fresh_unless)

log = logging.getLogger("popstack")

MODULES = {
    "prompt_prototype": PromptPrototypeModule,
    "co_attention": CoAttentionMLPModule,
    "hierarchical": CLIPHierarchicalPredictor,
}
MONITOR = {"prompt_prototype": ("val/loss", "min"), "co_attention": ("val/mae", "min"), "hierarchical": ("val/mae", "min")}
#: F-vector blocks (paper eq. 11) and the family each joins in the stack: the frozen CLIP features from the
#: embedding cache, and the prompt/prototype module's class-aligned blocks (see its module docstring: the learned
#: coordinates x~, V~, T~ differ from fold model to fold model and enter F as class-prototype similarities).
CLIP_BLOCKS = ("image_emb", "text_emb")
PROMPT_BLOCKS = ("w_global", "w_local", "sim_visual", "proto")
F_BLOCKS = {"image_emb": VISUAL, "text_emb": NEURAL_TEXT, **dict.fromkeys(PROMPT_BLOCKS, PROMPT)}
BACKBONE_FILE = "backbone.pt"
#: Per-post out-of-fold classification loss of the prompt/prototype module (``post_id, class_loss``).
CLASS_LOSS = "class_loss.parquet"


def _device(cfg: DictConfig) -> str:
    return "cuda" if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"


def _trainer_cfg(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def backbone_file(cfg: DictConfig, run_dir: Path) -> str:
    """The CLIP weights every neural module of this run uses: the run's own copy (``embeddings/backbone.pt``,
    written by :func:`build_cache` from the user's file, tag or random init), so inference reads nothing outside
    the run directory."""
    return str(run_dir / "embeddings" / BACKBONE_FILE)


def backbone_key(cfg: DictConfig) -> dict:
    """What the frozen backbone's weights are made of: name, and the sha256 of a user file, the hub tag, or
    random init with the run's seed."""
    from pipeline.manifest import file_digest

    pre = cfg.backbone.pretrained
    source = f"sha256:{file_digest(Path(pre))}" if pre and Path(pre).is_file() else (pre or f"random:{cfg.seed}")
    return {"name": cfg.backbone.name, "weights": source}


def build_cache(cfg: DictConfig, run_dir: Path, weights: str | None = None, key: dict | None = None) -> Path:
    """Encode every post once with the frozen backbone, split across ranks; skipped when the cache exists and was
    built with ``key`` (the shards, posts and backbone it encodes; None at inference, where the work directory is
    new).

    Each of the ``world_size`` processes (``pipeline.distributed.topology``) encodes its share of the shards
    (``make_eval_pipeline``: shard ``i`` goes to rank ``i % world_size``) into the rows of its posts in the one
    temporary folder ``embeddings.partial`` that rank 0 allocated, and lists the post ids it wrote in
    ``rank<r>.done.json``; rank 0 checks that every post was written exactly once and renames the folder (with
    ``key.json`` and, when training, the run's copy of the weights) to ``embeddings``; the other ranks wait for
    that. Without a process group yet, the ranks meet through files, each marked with the launch id so files of
    an earlier, interrupted launch are never mistaken for this one's.

    ``weights``: CLIP weights file to use instead of ``cfg.backbone.pretrained`` (inference uses the run's).
    """
    cache = run_dir / "embeddings"
    key_file = cache / KEY_FILE
    ready = (cache / "post_ids.json").is_file() and (recorded_key_is(key_file, key) if key else not key_file.exists())
    if ready and (weights is not None or (cache / BACKBONE_FILE).is_file()):
        return cache
    topo = topology()
    timeout = wait_timeout(cfg)
    tmp = partial_dir(cache)
    ready = tmp / "allocated.json"
    torch.manual_seed(int(cfg.seed))
    bb = load_backbone(cfg.backbone.name, weights or cfg.backbone.pretrained)
    posts = pd.read_parquet(run_dir / "posts.parquet", columns=[KEY, "split"])
    post_ids = posts[KEY].tolist()
    if topo.is_zero:
        if tmp.exists():  # left by an interrupted launch
            shutil.rmtree(tmp)
        positions = min(int(cfg.backbone.token_len), bb.context_length)
        for arr in allocate_cache(tmp, len(post_ids), bb.embed_dim, positions).values():
            arr.flush()
        atomic_write_json(ready, {"launch": topo.launch_id})
    else:
        wait_for(lambda: _launch_file(ready, topo.launch_id), f"{ready} (cache allocated by rank 0)", timeout)
    splits = [s for s in ("train", "test") if (posts.split == s).any()]
    loader = make_loader(make_eval_pipeline(
        shard_urls(run_dir / "shards", splits), decoder=SampleDecoder(bb.image_size, cfg.data.text_field),
        collate=Collate(bb.tokenizer), batch_size=int(cfg.backbone.embed_batch_size),
        rank=topo.rank, world_size=topo.world_size,
    ), int(cfg.data.num_workers))
    amp = torch.bfloat16 if str(cfg.trainer.precision).startswith("bf16") and _device(cfg) == "cuda" else None
    written = encode_into(bb.model, loader, open_cache_arrays(tmp), {p: i for i, p in enumerate(post_ids)},
                          token_len=int(cfg.backbone.token_len), device=_device(cfg), autocast_dtype=amp,
                          progress=topo.is_zero and bool(cfg.get("progress_bar", True)))
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
        torch.save(bb.model.cpu().state_dict(), tmp / BACKBONE_FILE)  # renamed into place with the folder
    if key is not None:
        atomic_write_json(tmp / KEY_FILE, key)
    ready.unlink()
    return finish_cache(tmp, cache, post_ids, parts)


def _launch_file(path: Path, launch_id: str) -> dict | None:
    """The JSON at ``path`` when it was written by this launch (its ``launch`` field), else None."""
    try:
        payload = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return payload if payload.get("launch") == launch_id else None


def _datamodule(cfg: DictConfig, run_dir: Path, name: str, fold: int | None) -> EmbeddingDataModule:
    m = cfg.model[name]
    return EmbeddingDataModule(
        str(run_dir / "embeddings"), str(run_dir / "posts.parquet"), str(run_dir / "folds.parquet"),
        str(run_dir / "vocab.json"), fold=fold, batch_size=int(m.batch_size), num_workers=int(cfg.data.num_workers),
        fields=getattr(MODULES[name], "cache_fields", EMBEDDING_FIELDS),
        tabular_path=str(run_dir / "features" / TABULAR) if name == "co_attention" and m.use_tabular else None,
        seed=int(cfg.seed) + (fold or 0),
    )


INPUTS = ("embeddings", "images")


def uses_shards(cfg: DictConfig, name: str) -> bool:
    """Whether module ``name`` trains (and predicts) on images read from the WebDataset shards rather than on the
    frozen-embedding cache: when CLIP is partly trainable (``backbone.trainable_last_blocks > 0``, the cache would
    hold stale features) or ``model.<name>.input: images`` asks for it. The cache stays the fast default."""
    kind = str(cfg.model[name].get("input", "embeddings"))
    if kind not in INPUTS:
        raise UserError(f"model.{name}.input must be one of {list(INPUTS)}, got {kind!r}")
    return int(cfg.backbone.trainable_last_blocks) > 0 or kind == "images"


def shard_datamodule(cfg: DictConfig, run_dir: Path, name: str, fold: int | None) -> PopularityDataModule:
    """Raw image + token batches of ``run_dir/shards`` for module ``name`` (``model.<name>.batch_size`` per device,
    as on the cached path): resampled training with equal batches per rank, epoch-seeded; every post once to
    predict. ``fold`` None: all labelled posts train (and prediction reads whichever splits have shards)."""
    m = cfg.model[name]
    shards = run_dir / "shards"
    return PopularityDataModule(
        str(shards), str(run_dir / "folds.parquet"), batch_size=int(m.batch_size), per_device=True,
        num_workers=int(cfg.data.num_workers), image_size=model_image_size(cfg.backbone.name),
        text_field=cfg.data.text_field, model_name=cfg.backbone.name, fold=fold, seed=int(cfg.seed) + (fold or 0),
        predict_splits=tuple(s for s in ("train", "test") if (shards / f"{s}-index.json").is_file()),
        tabular_path=str(run_dir / "features" / TABULAR) if name == "co_attention" and m.use_tabular else None,
    )


def build_module(cfg: DictConfig, run_dir: Path, name: str, dm: EmbeddingDataModule):
    """The module ``name`` for one fold, with the fold's label statistics (and prototypes).

    Modules trained over shards (``uses_shards``) get their own CLIP copy (the run's weights, the last
    ``backbone.trainable_last_blocks`` blocks trainable); prototypes and sizes always come from the cache.
    """
    m = OmegaConf.to_container(cfg.model[name], resolve=True)
    hp = {k: v for k, v in m.items() if k not in ("enabled", "batch_size", "epochs", "use_tabular", "shots",
                                                   "n_time_bins", "input",
                                                   "early_stopping_patience")}
    y = dm.meta.label.to_numpy()[dm.train_idx]
    hp.update(target_mean=float(np.mean(y)), target_std=float(np.std(y) or 1.0), token_len=int(cfg.backbone.token_len))
    cache = dm.cache
    if name == "prompt_prototype":
        vocab = json.loads((run_dir / "vocab.json").read_text())
        module = PromptPrototypeModule(class_names=vocab["subcategory"], backbone_name=cfg.backbone.name,
                                       backbone_pretrained=None,
                                       trainable_last_blocks=int(cfg.backbone.trainable_last_blocks), **hp)
        _load_run_clip(module, cfg, run_dir)
        posts = pd.read_parquet(run_dir / "posts.parquet", columns=["postdate", "concept", "uid", "title", "alltags"])
        train = posts.iloc[dm.train_idx].reset_index(drop=True).assign(
            subcategory_id=dm.meta.subcategory_id.to_numpy()[dm.train_idx])
        chosen = select_prototype_posts(train, shots=int(m["shots"]), n_time_bins=int(m["n_time_bins"]),
                                        seed=int(cfg.seed))
        chosen = {c: dm.train_idx[rows] for c, rows in chosen.items()}
        text_ok = ((posts.title.str.len() + posts.alltags.str.len()) > 0).to_numpy()
        visual, textual, filled = prototype_means(
            chosen, np.asarray(cache["image_emb"]), np.asarray(cache["text_emb"]), text_ok,
            np.asarray(cache["has_image"]), module.n_classes, module.class_name_features().cpu().numpy())
        if not filled.all():
            log.info("prompt_prototype: %d classes without training posts use class-name prototypes",
                     int((~filled).sum()))
        module.set_prototypes(torch.from_numpy(visual), torch.from_numpy(textual))
        return module
    embed_dim = int(cache["image_emb"].shape[1])
    shards = uses_shards(cfg, name)
    if shards:
        hp.update(backbone_name=cfg.backbone.name, backbone_pretrained=None,
                  trainable_last_blocks=int(cfg.backbone.trainable_last_blocks))
    if name == "co_attention":
        module = CoAttentionMLPModule(embed_dim=embed_dim, tabular_dim=dm.tabular_dim, **hp)
    else:
        module = CLIPHierarchicalPredictor(embed_dim=embed_dim, **hp)
    if shards:
        _load_run_clip(module, cfg, run_dir)
    return module


def _load_run_clip(module, cfg: DictConfig, run_dir: Path) -> None:
    """Load the run's CLIP weights into ``module.clip`` (built with ``backbone_pretrained=None``), so no weights
    path, absolute or not, lands in the checkpoint's hyperparameters: checkpoints carry the weights themselves."""
    module.clip.load_state_dict(torch.load(backbone_file(cfg, run_dir), map_location="cpu", weights_only=True))


def enabled_modules(cfg: DictConfig) -> list[str]:
    names = [n for n in MODULES if n in cfg.model and cfg.model[n].enabled]
    unknown = [n for n in cfg.model if n not in MODULES and n != "extract"]
    if unknown:
        raise ValueError(f"unknown model section(s) {unknown}; modules are {list(MODULES)}")
    return names


def train_neural(cfg: DictConfig, run_dir: Path, inputs: dict, backbone: dict) -> StageResult:
    """Train every enabled module on every fold, on the embedding cache or over the shards (``uses_shards``).

    ``inputs``: content checksums of the run files this stage reads (``pipeline.manifest``); ``backbone``: the
    weights' ``backbone_key`` (already computed for the stage hash: a user file is hashed once). The embedding
    cache and each fold's directory are keyed by them, by the fold assignment and the module's config, so nothing
    made from other inputs is reused."""
    bb = backbone
    cache_key = {"shards": inputs.get("shards"), "posts": inputs.get("posts.parquet"), "backbone": bb,
                 "token_len": int(cfg.backbone.token_len), "text_field": cfg.data.text_field,
                 "precision": str(cfg.trainer.precision)}
    build_cache(cfg, run_dir, key=cache_key)
    t = _trainer_cfg(cfg)
    topo, timeout = topology(), wait_timeout(cfg)
    metrics = {}
    outputs = ["embeddings"]
    for name in enabled_modules(cfg):
        monitor, mode = MONITOR[name]
        for fold in range(int(cfg.n_folds)):
            out = run_dir / "neural" / name / f"fold{fold}"
            key = {"data": inputs, "folds": inputs.get("folds.parquet"), "fold": fold, "seed": int(cfg.seed) + fold,
                   "model": OmegaConf.to_container(cfg.model[name], resolve=True), "backbone": {
                       **bb, "trainable_last_blocks": int(cfg.backbone.trainable_last_blocks),
                       "token_len": int(cfg.backbone.token_len)},
                   "trainer": result_trainer_args(t)}
            if topo.is_zero:  # one process clears a stale fold folder; the others wait until it is keyed
                start_fresh_unless(out, key)
            else:
                wait_for(lambda: recorded_key_is(out / KEY_FILE, key), f"{out / KEY_FILE} (keyed by rank 0)", timeout)
            if finished_checkpoint(out) is None:
                log.info("neural: training %s fold %d/%d", name, fold + 1, cfg.n_folds)
                torch.manual_seed(int(cfg.seed))  # one initialisation for every fold's model (training order: per fold)
                dm = _datamodule(cfg, run_dir, name, fold)
                module = build_module(cfg, run_dir, name, dm)
                data = shard_datamodule(cfg, run_dir, name, fold) if uses_shards(cfg, name) else dm
                fit_resumable(module, data, out, key=key if topo.is_zero else None, trainer_cfg=t,
                              max_epochs=int(cfg.model[name].epochs), monitor=monitor, mode=mode,
                              seed=int(cfg.seed) + fold, wandb_prefix=f"{name}/fold{fold}",
                              progress_bar=bool(cfg.get("progress_bar", True)),
                              early_stopping_patience=cfg.model[name].get("early_stopping_patience"))
            metrics[f"{name}/fold{fold}/{monitor}"] = read_done(out)["best_score"]
            outputs.append(f"neural/{name}/fold{fold}")
    return StageResult(outputs=outputs, metrics=metrics)


def load_module(name: str, checkpoint: str | Path):
    """A trained module from its checkpoint alone (CLIP weights come from the checkpoint itself)."""
    cls = MODULES[name]
    try:
        return cls.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=True,
                                        backbone_pretrained=None)
    except FileNotFoundError as err:
        raise UserError(f"checkpoint not found: {checkpoint}") from err
    except Exception as err:  # torch raises several types for a damaged file
        raise UserError(f"cannot load checkpoint {checkpoint}: {type(err).__name__}: {err}") from err


def predict_frames(cfg: DictConfig, dm: EmbeddingDataModule | PopularityDataModule, work: Path,
                   ckpts: dict[int, Path], name: str, post_ids: list[str]) -> dict[int, pd.DataFrame]:
    """Every post's outputs from each fold's checkpoint (``trainer.predict`` + keyed writer, merged by id).

    On many devices each rank predicts its share of the posts (the loader is made by the Trainer, once the ranks
    are known) and writes ``work/fold<k>/rank<r>.parquet``; ``work`` must be the same folder on every rank (the
    run directory, or ``pipeline.distributed.shared_tmpdir`` for ``predict.py``). After a barrier every rank reads
    all rank files, joined by post id (``merge_rank_outputs``: every post exactly once).
    """
    import lightning as L

    frames = {}
    t = _trainer_cfg(cfg)
    for fold, ckpt in ckpts.items():
        module = load_module(name, ckpt)
        out = work / f"fold{fold}"
        writer = KeyedPredictionWriter(out)
        trainer = L.Trainer(accelerator=t["accelerator"], devices=t["devices"], num_nodes=t["num_nodes"],
                            strategy=t["strategy"], precision=t["precision"], logger=False, callbacks=[writer],
                            enable_progress_bar=bool(cfg.get("progress_bar", True)), enable_model_summary=False)
        trainer.predict(module, datamodule=dm, return_predictions=False)
        trainer.strategy.barrier()  # every rank's file is written before anyone merges
        frames[fold] = merge_rank_outputs(out, post_ids).drop(columns=["class_pred"], errors="ignore")
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


def checkpoints(cfg: DictConfig, run_dir: Path, name: str) -> dict[int, Path]:
    """The best checkpoint of each fold of module ``name``."""
    out = {}
    for fold in range(int(cfg.n_folds)):
        fold_dir = run_dir / "neural" / name / f"fold{fold}"
        best = finished_checkpoint(fold_dir)
        if best is None:
            raise FileNotFoundError(f"{fold_dir / DONE}: {name} fold {fold} has not finished training")
        out[fold] = best
    return out


def _block_frame(cache, blocks) -> pd.DataFrame:
    return pd.concat([pd.DataFrame(np.asarray(cache[b]), columns=[f"{b}_{j:03d}" for j in range(cache[b].shape[1])])
                      for b in blocks], axis=1)


def neural_outputs(cfg: DictConfig, data_dir: Path, run_dir: Path, state: dict,
                   extras: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Neural features (the F vector blocks, PCA-reduced, + the cross-modal cosine) and predictions of every post
    laid out in ``data_dir`` (posts, folds, vocab, embeddings, features), with the checkpoints of ``run_dir``.

    Posts with a fold get out-of-fold outputs, the others (test, new and held-back posts) the mean over folds.
    The prompt/prototype module's class-aligned blocks are standardised per fold model first
    (``align_fold_outputs``); the CLIP blocks are the frozen embedding cache. ``state`` (per-fold alignment
    statistics, PCA bases) is filled on the training run and reused as is for new posts. A module without a
    popularity head adds no prediction column. ``extras``, when given, receives ``class_loss``: (n,) per-post
    classification loss of the prompt/prototype module (out-of-fold for posts with a fold), or nothing.
    """
    folds = read_folds(data_dir / "folds.parquet")
    post_ids = folds[KEY].tolist()
    labelled = folds["fold"].to_numpy() != NO_FOLD
    cache = load_embedding_cache(data_dir / "embeddings")
    preds = pd.DataFrame({KEY: post_ids})
    f_frame = _block_frame(cache, CLIP_BLOCKS)
    for name in enabled_modules(cfg):
        shards = uses_shards(cfg, name)
        dm = shard_datamodule(cfg, data_dir, name, None) if shards else _datamodule(cfg, data_dir, name, None)
        frames = predict_frames(cfg, dm, data_dir / "neural" / name / "predict", checkpoints(cfg, run_dir, name),
                                name, post_ids)
        if name == "prompt_prototype":
            cols = [c for c in next(iter(frames.values())).columns if c.rsplit("_", 1)[0] in PROMPT_BLOCKS]
            stats = state.setdefault(f"align.{name}", {})
            frames = align_fold_outputs(frames, cols, stats)
        merged = oof_and_test(frames, folds)
        if "prediction" in merged:
            preds[f"pred_{name}"] = merged["prediction"].to_numpy(dtype=np.float32)
        if name == "prompt_prototype":
            f_frame = pd.concat([f_frame, merged[cols]], axis=1)
            if extras is not None:
                extras["class_loss"] = merged["class_loss"].to_numpy(dtype=np.float64)
    nf = fit_pca_blocks(f_frame, labelled, int(cfg.model.extract.pca_dim), state)
    nf = pd.concat([nf, crossmodal_features(np.asarray(cache["image_emb"]), np.asarray(cache["text_emb"]),
                                            np.asarray(cache["has_image"]))], axis=1)
    nf.insert(0, KEY, post_ids)
    return nf, preds


def save_pca(state: dict, path: Path) -> None:
    """The extract state (PCA bases ``{block: (mean, components)}`` and per-fold alignment statistics
    ``{"align.<module>": {fold: (mean, std)}}``) as one ``.npz``."""
    arrays = {}
    for key, value in state.items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for fold, (a, b) in pairs:
            name = key if fold is None else f"{key}/fold{fold}"
            arrays[f"{name}.0"], arrays[f"{name}.1"] = a, b
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_pca(path: Path) -> dict:
    """Inverse of ``save_pca``."""
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


def extract_neural(cfg: DictConfig, run_dir: Path) -> StageResult:
    pca_state: dict = {}
    extras: dict = {}
    nf, preds = neural_outputs(cfg, run_dir, run_dir, pca_state, extras)
    out = run_dir / "neural"
    if not topology().is_zero:  # the other ranks took part in trainer.predict; the first process writes the results
        return StageResult(outputs=[])
    outputs = ["neural/features.parquet", "neural/predictions.parquet", "neural/families.json", "neural/pca.npz"]
    for name, frame in (("features.parquet", nf), ("predictions.parquet", preds)):
        with atomic_path(out / name) as tmp:
            frame.to_parquet(tmp, index=False)
    if "class_loss" in extras:  # ranks training rows for loss-based selection (CMPA-DGPL §4.2); not a feature
        with atomic_path(out / CLASS_LOSS) as tmp:
            pd.DataFrame({KEY: nf[KEY], "class_loss": extras["class_loss"]}).to_parquet(tmp, index=False)
        outputs.append(f"neural/{CLASS_LOSS}")
    save_pca(pca_state, out / "pca.npz")
    labels = pd.read_parquet(run_dir / "posts.parquet", columns=[LABEL])[LABEL].to_numpy()
    in_fold = read_folds(run_dir / "folds.parquet")["fold"].to_numpy() != NO_FOLD  # held-back labels stay unread
    from stacking.metrics import scores

    metrics = {f"{c}/{k}": v for c in preds.columns if c != KEY
               for k, v in scores(labels[in_fold], preds.loc[in_fold, c].to_numpy()).items()}
    for k, v in metrics.items():
        log.info("extract: out-of-fold %s = %.4f", k, v)
    families = {c: c.split("__", 1)[0] for c in nf.columns if c != KEY}
    families.update({c: NEURAL_PRED for c in preds.columns if c != KEY})
    atomic_write_json(out / "families.json", families)
    return StageResult(outputs=outputs,
                       counts={"neural_feature_columns": len(nf.columns) - 1, "prediction_columns": len(preds.columns) - 1},
                       metrics=metrics)
