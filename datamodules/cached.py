"""Map-style datasets over the frozen-embedding cache (written by ``lightning_modules.embed``) with folds.

Batches are in the cached form: ``post_id`` list[str]; ``image_emb``, ``text_emb`` (B, D) float32;
``text_tokens`` (B, L, D) float32; ``text_mask`` (B, L) bool; ``has_image`` (B,) bool; ``subcategory_id``,
``category_id`` (B,) int64 (-1 unknown); ``label`` (B,) float32 (NaN unknown); ``tabular`` (B, F) float32 when
a tabular parquet is given. Map-style, so Lightning shards it with a DistributedSampler under DDP.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.schema import KEY, LABEL, NO_FOLD, UNKNOWN_ID

CACHE_FILES = ("image_emb.npy", "text_emb.npy", "text_tokens.npy", "text_mask.npy", "has_image.npy", "post_ids.json")


def load_embedding_cache(cache_dir: str | Path, mmap: bool = True) -> dict:
    """The cache arrays (memory-mapped by default) and ``post_ids``."""
    cache_dir = Path(cache_dir)
    missing = [f for f in CACHE_FILES if not (cache_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{cache_dir}: embedding cache incomplete, missing {missing}")
    out: dict = {f.removesuffix(".npy"): np.load(cache_dir / f, mmap_mode="r" if mmap else None)
                 for f in CACHE_FILES if f.endswith(".npy")}
    out["post_ids"] = json.loads((cache_dir / "post_ids.json").read_text())
    return out


class CachedPosts(Dataset):
    """Rows ``indices`` of the cache (positions in posts order) as cached-form samples."""

    def __init__(self, cache: dict, meta: pd.DataFrame, indices: np.ndarray, tabular: np.ndarray | None):
        self.cache, self.meta, self.indices, self.tabular = cache, meta, np.asarray(indices), tabular

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        r = int(self.indices[i])
        m = self.meta
        sample = {
            "post_id": self.cache["post_ids"][r],
            "image_emb": torch.from_numpy(np.array(self.cache["image_emb"][r], dtype=np.float32)),
            "text_emb": torch.from_numpy(np.array(self.cache["text_emb"][r], dtype=np.float32)),
            "text_tokens": torch.from_numpy(np.array(self.cache["text_tokens"][r], dtype=np.float32)),
            "text_mask": torch.from_numpy(np.array(self.cache["text_mask"][r])),
            "has_image": bool(self.cache["has_image"][r]),
            "subcategory_id": int(m.subcategory_id[r]),
            "category_id": int(m.category_id[r]),
            "label": float(m.label[r]),
        }
        if self.tabular is not None:
            sample["tabular"] = torch.from_numpy(self.tabular[r])
        return sample


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch from (seed, epoch): reproducible, and identical after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class EmbeddingDataModule(L.LightningDataModule):
    """Train = labelled posts outside ``fold`` (all labelled when None); val = the fold; predict = every post.

    Args:
        cache_dir: the embedding cache. posts_path: ``posts.parquet`` (same row order as the cache).
        folds_path: ``folds.parquet``. vocab_path: ``vocab.json`` (class ids). tabular_path: optional parquet of
        imputed, standardised tabular features keyed by ``post_id``.
        batch_size: per-device batch size.
    """

    def __init__(self, cache_dir: str, posts_path: str, folds_path: str, vocab_path: str, *, fold: int | None,
                 batch_size: int = 128, num_workers: int = 0, tabular_path: str | None = None, seed: int = 0):
        super().__init__()
        self.cache = load_embedding_cache(cache_dir)
        posts = pd.read_parquet(posts_path, columns=[KEY, LABEL, "subcategory", "category"])
        if posts[KEY].tolist() != list(self.cache["post_ids"]):
            raise ValueError(f"{cache_dir}: cache rows do not match {posts_path} (recompute the cache)")
        vocab = json.loads(Path(vocab_path).read_text())
        ids = {f: {n: i for i, n in enumerate(vocab[f])} for f in ("subcategory", "category")}
        self.meta = pd.DataFrame({
            "subcategory_id": posts["subcategory"].map(ids["subcategory"]).fillna(UNKNOWN_ID).astype(np.int64),
            "category_id": posts["category"].map(ids["category"]).fillna(UNKNOWN_ID).astype(np.int64),
            "label": posts[LABEL].astype(np.float32),
        })
        folds = pd.read_parquet(folds_path)
        if folds[KEY].tolist() != posts[KEY].tolist():
            raise ValueError(f"{folds_path}: rows do not match {posts_path}")
        f = folds["fold"].to_numpy()
        labelled = f != NO_FOLD
        self.train_idx = np.flatnonzero(labelled & (f != fold)) if fold is not None else np.flatnonzero(labelled)
        self.val_idx = np.flatnonzero(f == fold) if fold is not None else np.array([], dtype=np.int64)
        self.tabular = None
        if tabular_path:
            tab = pd.read_parquet(tabular_path)
            tab = tab.set_index(KEY).reindex(posts[KEY])
            if tab.isna().all(axis=1).any():
                missing = tab.index[tab.isna().all(axis=1)][:5].tolist()
                raise ValueError(f"{tabular_path}: no tabular row for posts {missing}")
            self.tabular = tab.to_numpy(dtype=np.float32)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    @property
    def tabular_dim(self) -> int:
        return 0 if self.tabular is None else self.tabular.shape[1]

    def dataset(self, indices: np.ndarray) -> CachedPosts:
        return CachedPosts(self.cache, self.meta, indices, self.tabular)

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1  # each rank gets 1/world of the posts
        return DataLoader(self.dataset(self.train_idx), batch_size=self.batch_size,
                          sampler=EpochSeededSampler(len(self.train_idx), self.seed), num_workers=self.num_workers,
                          drop_last=len(self.train_idx) // world > self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_idx) == 0:
            return []
        return DataLoader(self.dataset(self.val_idx), batch_size=self.batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset(np.arange(len(self.meta))), batch_size=self.batch_size,
                          num_workers=self.num_workers)
