"""Stages 3 and 4: the embedding cache, per-fold training of the neural modules, and extraction.

Models (``cfg.model.modules``): ``prompt_prototype`` (CMPA-DGPL), ``co_attention`` (HyperFusion co-attention MLP),
``hierarchical`` (CLIP hierarchical predictor). Each is trained once per fold of the shared fold assignment, so
its predictions for labelled posts are out-of-fold and line up with the stack's folds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.cached import EMBEDDING_FIELDS, EmbeddingDataModule, load_embedding_cache
from datamodules.folds import read_folds
from datamodules.schema import KEY, LABEL, NO_FOLD
from datamodules.shards import Collate, SampleDecoder, make_eval_pipeline, make_loader, shard_urls
from features.crossmodal import crossmodal_features
from features.families import NEURAL_PRED, NEURAL_TEXT, PROMPT, VISUAL
from lightning_modules.backbone import load_backbone
from lightning_modules.embed import compute_embedding_cache
from lightning_modules.extract import KeyedPredictionWriter, merge_rank_outputs, oof_and_test
from lightning_modules.prompt_prototype_module import PromptPrototypeModule
from lightning_modules.prototypes import prototype_means, select_prototype_posts
from lightning_modules.regressors import CLIPHierarchicalPredictor, CoAttentionMLPModule
from pipeline.featurize import TABULAR
from pipeline.manifest import StageResult
from pipeline.training import fit_resumable

log = logging.getLogger("popstack")

MODULES = {
    "prompt_prototype": PromptPrototypeModule,
    "co_attention": CoAttentionMLPModule,
    "hierarchical": CLIPHierarchicalPredictor,
}
MONITOR = {"prompt_prototype": ("val/loss", "min"), "co_attention": ("val/mae", "min"), "hierarchical": ("val/mae", "min")}
#: F-vector blocks of the prompt/prototype module (paper eq. 11) and the family each joins in the stack.
F_BLOCKS = {"image_emb": VISUAL, "text_emb": NEURAL_TEXT, "w_global": PROMPT, "w_local": PROMPT,
            "x_tilde": PROMPT, "V_pool": PROMPT, "T_pool": PROMPT}
BACKBONE_FILE = "backbone.pt"


def _device(cfg: DictConfig) -> str:
    return "cuda" if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"


def _trainer_cfg(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def backbone_file(cfg: DictConfig, run_dir: Path) -> str:
    """The CLIP weights every neural module of this run uses (a user file, or the run's saved copy)."""
    pre = cfg.backbone.pretrained
    if pre and Path(pre).is_file():
        return str(Path(pre).resolve())
    return str(run_dir / "embeddings" / BACKBONE_FILE)


def build_cache(cfg: DictConfig, run_dir: Path, weights: str | None = None) -> Path:
    """Encode every post once with the frozen backbone (skipped when the cache exists).

    ``weights``: CLIP weights file to use instead of ``cfg.backbone.pretrained`` (inference uses the run's).
    """
    cache = run_dir / "embeddings"
    if (cache / "post_ids.json").is_file():
        return cache
    torch.manual_seed(int(cfg.seed))
    bb = load_backbone(cfg.backbone.name, weights or cfg.backbone.pretrained)
    posts = pd.read_parquet(run_dir / "posts.parquet", columns=[KEY, "split"])
    splits = [s for s in ("train", "test") if (posts.split == s).any()]
    loader = make_loader(make_eval_pipeline(
        shard_urls(run_dir / "shards", splits), decoder=SampleDecoder(bb.image_size, cfg.data.text_field),
        collate=Collate(bb.tokenizer), batch_size=int(cfg.backbone.embed_batch_size), rank=0, world_size=1,
    ), int(cfg.data.num_workers))
    amp = torch.bfloat16 if str(cfg.trainer.precision).startswith("bf16") and _device(cfg) == "cuda" else None
    compute_embedding_cache(bb.model, loader, cache, post_ids=posts[KEY].tolist(),
                            token_len=int(cfg.backbone.token_len), device=_device(cfg), autocast_dtype=amp)
    if weights is None and not (cfg.backbone.pretrained and Path(cfg.backbone.pretrained).is_file()):
        torch.save(bb.model.cpu().state_dict(), cache / BACKBONE_FILE)
    return cache


def _datamodule(cfg: DictConfig, run_dir: Path, name: str, fold: int | None) -> EmbeddingDataModule:
    m = cfg.model[name]
    return EmbeddingDataModule(
        str(run_dir / "embeddings"), str(run_dir / "posts.parquet"), str(run_dir / "folds.parquet"),
        str(run_dir / "vocab.json"), fold=fold, batch_size=int(m.batch_size), num_workers=int(cfg.data.num_workers),
        fields=getattr(MODULES[name], "cache_fields", EMBEDDING_FIELDS),
        tabular_path=str(run_dir / "features" / TABULAR) if name == "co_attention" and m.use_tabular else None,
        seed=int(cfg.seed) + (fold or 0),
    )


def build_module(cfg: DictConfig, run_dir: Path, name: str, dm: EmbeddingDataModule):
    """The module ``name`` for one fold, with the fold's label statistics (and prototypes)."""
    m = OmegaConf.to_container(cfg.model[name], resolve=True)
    hp = {k: v for k, v in m.items() if k not in ("enabled", "batch_size", "epochs", "use_tabular", "shots",
                                                   "n_time_bins")}
    y = dm.meta.label.to_numpy()[dm.train_idx]
    hp.update(target_mean=float(np.mean(y)), target_std=float(np.std(y) or 1.0), token_len=int(cfg.backbone.token_len))
    cache = dm.cache
    if name == "prompt_prototype":
        vocab = json.loads((run_dir / "vocab.json").read_text())
        module = PromptPrototypeModule(class_names=vocab["subcategory"], backbone_name=cfg.backbone.name,
                                       backbone_pretrained=backbone_file(cfg, run_dir),
                                       trainable_last_blocks=int(cfg.backbone.trainable_last_blocks), **hp)
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
    if name == "co_attention":
        return CoAttentionMLPModule(embed_dim=embed_dim, tabular_dim=dm.tabular_dim, **hp)
    return CLIPHierarchicalPredictor(embed_dim=embed_dim, **hp)


def enabled_modules(cfg: DictConfig) -> list[str]:
    names = [n for n in MODULES if n in cfg.model and cfg.model[n].enabled]
    unknown = [n for n in cfg.model if n not in MODULES and n != "extract"]
    if unknown:
        raise ValueError(f"unknown model section(s) {unknown}; modules are {list(MODULES)}")
    return names


def train_neural(cfg: DictConfig, run_dir: Path) -> StageResult:
    build_cache(cfg, run_dir)
    metrics = {}
    for name in enabled_modules(cfg):
        monitor, mode = MONITOR[name]
        for fold in range(int(cfg.n_folds)):
            out = run_dir / "neural" / name / f"fold{fold}"
            dm = _datamodule(cfg, run_dir, name, fold)
            if (out / "done.json").is_file():
                best = json.loads((out / "done.json").read_text())
            else:
                log.info("neural: training %s fold %d/%d", name, fold + 1, cfg.n_folds)
                module = build_module(cfg, run_dir, name, dm)
                fit_resumable(module, dm, out, trainer_cfg=_trainer_cfg(cfg), max_epochs=int(cfg.model[name].epochs),
                              monitor=monitor, mode=mode, seed=int(cfg.seed) + fold, wandb_prefix=f"{name}/fold{fold}",
                              progress_bar=bool(cfg.get("progress_bar", True)))
                best = json.loads((out / "done.json").read_text())
            metrics[f"{name}/fold{fold}/{monitor}"] = best["best_score"]
    return StageResult(outputs=["embeddings", "neural"], metrics=metrics)


def load_module(name: str, checkpoint: str | Path):
    """A trained module from its checkpoint alone (CLIP weights come from the checkpoint itself)."""
    from pipeline.errors import UserError

    cls = MODULES[name]
    kwargs = {"backbone_pretrained": None} if name == "prompt_prototype" else {}
    try:
        return cls.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=True, **kwargs)
    except FileNotFoundError as err:
        raise UserError(f"checkpoint not found: {checkpoint}") from err
    except Exception as err:  # torch raises several types for a damaged file
        raise UserError(f"cannot load checkpoint {checkpoint}: {type(err).__name__}: {err}") from err


def predict_frames(cfg: DictConfig, dm: EmbeddingDataModule, work: Path, ckpts: dict[int, Path], name: str,
                   post_ids: list[str]) -> dict[int, pd.DataFrame]:
    """Every post's outputs from each fold's checkpoint (``trainer.predict`` + keyed writer, merged by id)."""
    import lightning as L

    frames = {}
    t = _trainer_cfg(cfg)
    for fold, ckpt in ckpts.items():
        module = load_module(name, ckpt)
        out = work / f"fold{fold}"
        writer = KeyedPredictionWriter(out)
        trainer = L.Trainer(accelerator=t["accelerator"], devices=t["devices"], num_nodes=t["num_nodes"],
                            strategy=t["strategy"], precision=t["precision"], logger=False, callbacks=[writer],
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.predict(module, dataloaders=dm.predict_dataloader(), return_predictions=False)
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
        done = run_dir / "neural" / name / f"fold{fold}" / "done.json"
        if not done.is_file():
            raise FileNotFoundError(f"{done}: {name} fold {fold} has not finished training")
        out[fold] = Path(json.loads(done.read_text())["best"])
    return out


def neural_outputs(cfg: DictConfig, data_dir: Path, run_dir: Path, pca_state: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Neural features (the F vector blocks, PCA-reduced, + the cross-modal cosine) and predictions of every post
    laid out in ``data_dir`` (posts, folds, vocab, embeddings, features), with the checkpoints of ``run_dir``.

    Training posts get out-of-fold outputs, the others the mean over folds. ``pca_state`` is filled on the
    training run and reused as is for new posts.
    """
    folds = read_folds(data_dir / "folds.parquet")
    post_ids = folds[KEY].tolist()
    labelled = folds["fold"].to_numpy() != NO_FOLD
    cache = load_embedding_cache(data_dir / "embeddings")
    preds = pd.DataFrame({KEY: post_ids})
    f_frame = None
    for name in enabled_modules(cfg):
        dm = _datamodule(cfg, data_dir, name, None)
        frames = predict_frames(cfg, dm, data_dir / "neural" / name / "predict", checkpoints(cfg, run_dir, name),
                                name, post_ids)
        merged = oof_and_test(frames, folds)
        preds[f"pred_{name}"] = merged["prediction"].to_numpy(dtype=np.float32)
        if name == "prompt_prototype":
            f_frame = merged.drop(columns=[KEY, "prediction"])
    if f_frame is None:  # no prompt module: the trees still get the frozen CLIP features
        f_frame = pd.concat([
            pd.DataFrame(np.asarray(cache[b]), columns=[f"{b}_{j:03d}" for j in range(cache[b].shape[1])])
            for b in ("image_emb", "text_emb")], axis=1)
    nf = fit_pca_blocks(f_frame, labelled, int(cfg.model.extract.pca_dim), pca_state)
    nf = pd.concat([nf, crossmodal_features(np.asarray(cache["image_emb"]), np.asarray(cache["text_emb"]),
                                            np.asarray(cache["has_image"]))], axis=1)
    nf.insert(0, KEY, post_ids)
    return nf, preds


def save_pca(state: dict, path: Path) -> None:
    np.savez(path, **{f"{b}.{part}": arr for b, (m, c) in state.items() for part, arr in (("mean", m), ("components", c))})


def load_pca(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        blocks = {k.rsplit(".", 1)[0] for k in z.files}
        return {b: (z[f"{b}.mean"], z[f"{b}.components"]) for b in blocks}


def extract_neural(cfg: DictConfig, run_dir: Path) -> StageResult:
    from pipeline.stages import is_child_process

    pca_state: dict = {}
    nf, preds = neural_outputs(cfg, run_dir, run_dir, pca_state)
    out = run_dir / "neural"
    if is_child_process():  # DDP children took part in trainer.predict; the first process writes the results
        return StageResult(outputs=[])
    nf.to_parquet(out / "features.parquet", index=False)
    preds.to_parquet(out / "predictions.parquet", index=False)
    save_pca(pca_state, out / "pca.npz")
    labels = pd.read_parquet(run_dir / "posts.parquet", columns=[LABEL])[LABEL].to_numpy()
    labelled = ~np.isnan(labels)
    from stacking.metrics import scores

    metrics = {f"{c}/{k}": v for c in preds.columns if c != KEY
               for k, v in scores(labels[labelled], preds.loc[labelled, c].to_numpy()).items()}
    for k, v in metrics.items():
        log.info("extract: out-of-fold %s = %.4f", k, v)
    families = {c: c.split("__", 1)[0] for c in nf.columns if c != KEY}
    families.update({c: NEURAL_PRED for c in preds.columns if c != KEY})
    (out / "families.json").write_text(json.dumps(families, indent=1))
    return StageResult(outputs=["neural/features.parquet", "neural/predictions.parquet", "neural/families.json",
                                "neural/pca.npz"],
                       counts={"neural_feature_columns": len(nf.columns) - 1, "prediction_columns": len(preds.columns) - 1},
                       metrics=metrics)
