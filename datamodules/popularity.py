"""LightningDataModule over the WebDataset shards, with fold support (raw image + token batches).

``train.py`` trains a neural module through it when the module needs images, not the frozen-embedding cache:
``backbone.trainable_last_blocks > 0`` (the last CLIP blocks fine-tune) or ``model.<name>.input: images``.
An epoch visits every training post once across ranks and workers, in an epoch-seeded order, with the same number of
batches on every rank (the loader's length: the learning-rate schedule's step count), so DDP ranks never wait on
each other; validation is split by post, so every rank validates its share; prediction reads every post exactly
once across ranks (``datamodules.shards``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import pandas as pd
import torch

from popstack.datamodules.folds import read_folds, train_valid_masks
from popstack.datamodules.schema import KEY, NO_FOLD
from popstack.datamodules.shards import (
    Collate,
    KeepPosts,
    SampleDecoder,
    SharedEpoch,
    device_batch_size,
    dist_info,
    kept_keys,
    make_eval_pipeline,
    make_loader,
    make_split_eval_pipeline,
    make_train_pipeline,
    shard_urls,
)


class PopularityDataModule(L.LightningDataModule):
    """Raw batches (``image``, ``text_ids``, ids, labels) from ``shard_dir``.

    Args:
        shard_dir: folder with ``{split}-*.tar`` and ``{split}-index.json`` (prepare stage).
        folds_path: ``folds.parquet`` (``post_id, fold``); training = labelled posts with fold != ``fold``
            (all labelled posts when ``fold`` is None), validation = posts of ``fold``.
        batch_size: global batch size; each of the ``world_size`` ranks loads ``batch_size / world_size``
            (``datamodules.shards.device_batch_size``: training needs it divisible).
        model_name: open_clip model whose tokenizer encodes the post text.
        predict_splits: splits read by ``predict_dataloader`` (every post once, across ranks).
        tabular_path: optional parquet keyed by ``post_id`` (imputed, standardised tabular features); its row of
            each post joins the batch as ``tabular`` (B, F) float32.
    """

    def __init__(
        self,
        shard_dir: str,
        folds_path: str,
        *,
        batch_size: int = 128,
        num_workers: int = 0,
        image_size: int = 224,
        text_field: str = "title+alltags",
        model_name: str = "ViT-B-32",
        fold: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        predict_splits: tuple[str, ...] = ("train", "test"),
        tabular_path: str | None = None,
    ):
        super().__init__()
        self.shard_dir = Path(shard_dir)
        self.folds = read_folds(folds_path)
        self.global_batch_size = batch_size
        self.num_workers = num_workers
        self.fold = fold
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.predict_splits = tuple(predict_splits)
        self.decoder = SampleDecoder(image_size, text_field)
        collate = Collate(open_clip.get_tokenizer(model_name))
        self.collate = collate if tabular_path is None else TabularCollate(collate, tabular_path)
        self.epoch = SharedEpoch()
        self._kept: dict[str, list[list[str]]] = {}
        if fold is None:
            self.train_ids, self.val_ids = self.folds.loc[self.folds.fold != NO_FOLD, KEY].tolist(), []
        else:
            train, valid = train_valid_masks(self.folds.fold.to_numpy(), fold)
            self.train_ids, self.val_ids = self.folds.loc[train, KEY].tolist(), self.folds.loc[valid, KEY].tolist()
            if not self.val_ids:
                raise ValueError(f"fold {fold} has no posts in {folds_path}")

    def per_device_batch_size(self, training: bool = True) -> int:
        return device_batch_size(self.global_batch_size, self._rank_world()[1], training)

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world size): the Trainer's once it drives this datamodule, else ``dist_info``."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else dist_info()

    def _keys(self, which: str) -> list[list[str]]:
        """The kept keys of each training shard for ``which`` (train | val), read from the tar headers once."""
        if which not in self._kept:
            ids = self.train_ids if which == "train" else self.val_ids
            self._kept[which] = kept_keys(shard_urls(self.shard_dir, ["train"]), KeepPosts(ids))
        return self._kept[which]

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def train_dataloader(self):
        rank, world = self._rank_world()
        pipeline = make_train_pipeline(
            shard_urls(self.shard_dir, ["train"]), decoder=self.decoder, collate=self.collate,
            batch_size=self.per_device_batch_size(), num_workers=self.num_workers, seed=self.seed, epoch=self.epoch,
            keys=self._keys("train"), shuffle_buffer=self.shuffle_buffer, rank=rank, world_size=world,
        )
        return make_loader(pipeline, self.num_workers)

    def val_dataloader(self):
        if not self.val_ids:
            return []
        rank, world = self._rank_world()
        pipeline = make_split_eval_pipeline(
            shard_urls(self.shard_dir, ["train"]), decoder=self.decoder, collate=self.collate,
            batch_size=self.per_device_batch_size(training=False), num_workers=self.num_workers,
            keys=self._keys("val"), rank=rank, world_size=world,
        )
        return make_loader(pipeline, self.num_workers)

    def predict_dataloader(self):
        rank, world = self._rank_world()
        pipeline = make_eval_pipeline(
            shard_urls(self.shard_dir, list(self.predict_splits)), decoder=self.decoder, collate=self.collate,
            batch_size=self.per_device_batch_size(training=False), rank=rank, world_size=world,
        )
        return make_loader(pipeline, self.num_workers)


class TabularCollate:
    """``Collate`` plus each post's tabular row (looked up by post id). Picklable, so it runs in loader workers."""

    def __init__(self, collate: Collate, tabular_path: str):
        table = pd.read_parquet(tabular_path)
        self.path = str(tabular_path)
        self.rows = {pid: i for i, pid in enumerate(table[KEY].tolist())}
        self.values = table.drop(columns=[KEY]).to_numpy(dtype=np.float32)
        self.collate = collate

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collate(samples)
        missing = [p for p in batch["post_id"] if p not in self.rows]
        if missing:
            raise ValueError(f"{self.path}: no tabular row for posts {missing[:5]}")
        batch["tabular"] = torch.from_numpy(self.values[[self.rows[p] for p in batch["post_id"]]])
        return batch
