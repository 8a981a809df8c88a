"""Map-style datasets over the frozen-embedding cache (written by ``lightning_modules.embed``) with folds.

Batches are in the cached form: ``post_id`` list[str]; ``image_emb``, ``text_emb`` (B, D) float32;
``text_tokens`` (B, L, D) float32; ``text_mask`` (B, L) bool; ``image_tokens`` (B, P, D) float32 patch tokens
when the cache holds them (the embedding arrays only when the model reads them); ``has_image`` (B,) bool;
``subcategory_id``,
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

from popstack.datamodules.folds import train_valid_masks
from popstack.datamodules.schema import KEY, LABEL, NO_FOLD, UNKNOWN_ID
from popstack.datamodules.shards import device_batch_size

CACHE_FILES = ("image_emb.npy", "text_emb.npy", "text_tokens.npy", "text_mask.npy", "has_image.npy", "post_ids.json")


def load_embedding_cache(cache_dir: str | Path, mmap: bool = True) -> dict:
    """The cache arrays (memory-mapped by default) and ``post_ids``."""
    cache_dir = Path(cache_dir)
    missing = [f for f in CACHE_FILES if not (cache_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{cache_dir}: embedding cache incomplete, missing {missing}")
    out: dict = {f.removesuffix(".npy"): np.load(cache_dir / f, mmap_mode="r" if mmap else None)
                 for f in CACHE_FILES if f.endswith(".npy")}
    for optional in OPTIONAL_FIELDS:  # written only when asked for (e.g. patch tokens for the co-attention MLP)
        if (cache_dir / f"{optional}.npy").is_file():
            out[optional] = np.load(cache_dir / f"{optional}.npy", mmap_mode="r" if mmap else None)
    out["post_ids"] = json.loads((cache_dir / "post_ids.json").read_text())
    return out


#: Cache arrays a batch may carry; a model names the ones it reads (``fields``), the rest are never touched.
EMBEDDING_FIELDS = ("image_emb", "text_emb", "text_tokens", "text_mask")
#: Cache arrays present only when the cache was built with them: ``image_tokens`` (n, P, D) float16 patch tokens.
OPTIONAL_FIELDS = ("image_tokens",)


class CachedPosts(Dataset):
    """Rows ``indices`` of the cache (positions in posts order) as cached-form samples.

    The DataLoader fetches a whole batch with ``__getitems__`` (one fancy-index gather per array, sorted positions
    for sequential reads of a memory-mapped cache) and passes it through ``keep_batch`` as the collate function;
    ``fields`` are the embedding arrays read (e.g. the hierarchical predictor needs ``image_emb`` and ``text_emb``,
    not the (L, D) token features). ``dataset[i]`` gives one sample in the same form without the batch axis.
    """

    def __init__(self, cache: dict, meta: pd.DataFrame, indices: np.ndarray, tabular: np.ndarray | None,
                 fields: tuple[str, ...] = EMBEDDING_FIELDS):
        unknown = [f for f in fields if f not in EMBEDDING_FIELDS + OPTIONAL_FIELDS]
        if unknown:
            raise ValueError(f"unknown cache fields {unknown}; fields are {list(EMBEDDING_FIELDS + OPTIONAL_FIELDS)}")
        absent = [f for f in fields if f not in cache]
        if absent:
            raise ValueError(f"the embedding cache has no {absent} (built without them: rebuild it with the model on)")
        self.cache, self.indices, self.tabular, self.fields = cache, np.asarray(indices), tabular, tuple(fields)
        self.meta = {c: meta[c].to_numpy() for c in ("subcategory_id", "category_id", "label")}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, items: list[int]) -> dict:
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))

        def gather(arr: np.ndarray) -> np.ndarray:  # read in file order, return in batch order
            return np.asarray(arr[sorted_rows])[inverse]

        batch = {"post_id": [self.cache["post_ids"][r] for r in rows]}
        for f in self.fields:
            arr = gather(self.cache[f])
            batch[f] = torch.from_numpy(arr if f == "text_mask" else arr.astype(np.float32, copy=False))
        batch["has_image"] = torch.from_numpy(gather(self.cache["has_image"]).astype(bool))
        batch["subcategory_id"] = torch.from_numpy(self.meta["subcategory_id"][rows].astype(np.int64))
        batch["category_id"] = torch.from_numpy(self.meta["category_id"][rows].astype(np.int64))
        batch["label"] = torch.from_numpy(self.meta["label"][rows].astype(np.float32))
        if self.tabular is not None:
            batch["tabular"] = torch.from_numpy(self.tabular[rows])
        return batch

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {k: bool(v[0]) if k == "has_image" else v[0] for k, v in batch.items()}


def keep_batch(batch: dict) -> dict:
    """Collate function of ``CachedPosts`` loaders: the dataset already returns whole batches."""
    return batch


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
    ``all_posts``: train on every post with a known subcategory, labelled or not, and validate on none (a model
    that reads no popularity label, e.g. the classification-only F model of ``pipeline.neural``).

    Args:
        cache_dir: the embedding cache. posts_path: ``posts.parquet`` (same row order as the cache).
        folds_path: ``folds.parquet``. vocab_path: ``vocab.json`` (class ids). tabular_path: optional parquet of
        imputed, standardised tabular features keyed by ``post_id``.
        batch_size: global batch size, divided across the Trainer's devices (``shards.device_batch_size``: training
        needs it divisible). num_workers: loader worker processes (``data.num_workers``).
        fields: the cache arrays the model reads (``EMBEDDING_FIELDS`` or a subset).
    """

    def __init__(self, cache_dir: str, posts_path: str, folds_path: str, vocab_path: str, *, fold: int | None,
                 batch_size: int = 128, num_workers: int = 0, tabular_path: str | None = None, seed: int = 0,
                 fields: tuple[str, ...] = EMBEDDING_FIELDS, all_posts: bool = False):
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
        if all_posts:
            known = self.meta["subcategory_id"].to_numpy() != UNKNOWN_ID
            self.train_idx, self.val_idx = np.flatnonzero(known), np.array([], dtype=np.int64)
        elif fold is None:
            self.train_idx, self.val_idx = np.flatnonzero(f != NO_FOLD), np.array([], dtype=np.int64)
        else:
            train, valid = train_valid_masks(f, fold)
            self.train_idx, self.val_idx = np.flatnonzero(train), np.flatnonzero(valid)
        self.tabular = None
        if tabular_path:
            tab = pd.read_parquet(tabular_path)
            tab = tab.set_index(KEY).reindex(posts[KEY])
            if tab.isna().all(axis=1).any():
                missing = tab.index[tab.isna().all(axis=1)][:5].tolist()
                raise ValueError(f"{tabular_path}: no tabular row for posts {missing}")
            self.tabular = tab.to_numpy(dtype=np.float32)
        self.batch_size, self.num_workers, self.seed, self.fields = batch_size, num_workers, seed, tuple(fields)

    @property
    def tabular_dim(self) -> int:
        return 0 if self.tabular is None else self.tabular.shape[1]

    def dataset(self, indices: np.ndarray) -> CachedPosts:
        return CachedPosts(self.cache, self.meta, indices, self.tabular, self.fields)

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _loader(self, indices: np.ndarray, training: bool = False, **kwargs) -> DataLoader:
        return DataLoader(self.dataset(indices), batch_size=device_batch_size(self.batch_size, self._world(), training),
                          num_workers=self.num_workers, collate_fn=keep_batch, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> DataLoader:
        world = self._world()  # each rank gets 1/world of the posts
        return self._loader(self.train_idx, training=True, sampler=EpochSeededSampler(len(self.train_idx), self.seed),
                            drop_last=len(self.train_idx) // world > device_batch_size(self.batch_size, world))

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_idx) == 0:
            return []
        return self._loader(self.val_idx)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(np.arange(len(self.meta)))
