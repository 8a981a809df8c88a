"""Checkpoint-based extraction: predictions and feature vectors keyed by post id, on 1 or many devices.

Each rank writes its ``predict_step`` outputs to ``<out_dir>/rank<r>.parquet`` (``KeyedPredictionWriter``);
``merge_rank_outputs`` joins them into one row per post. ``oof_and_test`` turns per-fold outputs into the
stack's inputs: for a labelled post the output of the model whose fold held it out, for an unlabelled post the
mean over the fold models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from popstack.datamodules.atomic import atomic_path
from popstack.datamodules.schema import KEY, NO_FOLD


def outputs_to_frame(outputs: list[dict[str, Any]]) -> pd.DataFrame:
    """predict_step dicts -> DataFrame: ``post_id`` + one column per scalar output, ``<name>_<j>`` per vector."""
    cols: dict[str, np.ndarray] = {}
    ids: list[str] = []
    keys = [k for k in outputs[0] if k != KEY] if outputs else []
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for out in outputs:
        ids.extend(out[KEY])
        for k in keys:
            v = out[k]
            chunks[k].append(v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
    for k, parts in chunks.items():
        arr = np.concatenate(parts)
        if arr.ndim == 1:
            cols[k] = arr
        else:
            for j in range(arr.shape[1]):
                cols[f"{k}_{j:03d}"] = arr[:, j]
    frame = pd.DataFrame(cols)
    frame.insert(0, KEY, ids)
    return frame


#: One rank's predict outputs inside a writer's folder.
RANK_FILE = "rank{rank}.parquet"
_RANK_FILE_RE = re.compile(r"rank(\d+)\.parquet")


def stale_rank_files(out_dir: str | Path, world_size: int) -> list[Path]:
    """Rank files of ``out_dir`` no rank of a ``world_size`` launch writes (left by an earlier one with more
    devices)."""
    out = []
    for path in Path(out_dir).glob(RANK_FILE.format(rank="*")):
        m = _RANK_FILE_RE.fullmatch(path.name)
        if m is None or int(m.group(1)) >= world_size:
            out.append(path)
    return out


class KeyedPredictionWriter(BasePredictionWriter):
    """Collect this rank's predict outputs and write them at epoch end to ``out_dir/rank<r>.parquet``.

    At the start of prediction the first rank deletes the rank files of ranks this launch does not have (an earlier
    prediction with more devices); each rank overwrites its own.
    """

    def __init__(self, out_dir: str | Path):
        super().__init__(write_interval="batch_and_epoch")
        self.out_dir = Path(out_dir)
        self._outputs: list[dict] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            for path in stale_rank_files(self.out_dir, trainer.world_size):
                path.unlink(missing_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self._outputs.append(prediction)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        frame = outputs_to_frame(self._outputs)
        path = self.out_dir / RANK_FILE.format(rank=trainer.global_rank)
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
        self._outputs = []


def merge_rank_outputs(out_dir: str | Path, expected_post_ids: list[str],
                       world_size: int | None = None) -> pd.DataFrame:
    """Concatenate the rank files; identical duplicate rows (DDP padding) are dropped; rows in expected order.

    ``world_size``: read exactly the files of ranks ``0 .. world_size - 1`` (one missing raises); None: every rank
    file of the folder. Raises ``ValueError`` naming posts that are missing, unexpected, or duplicated with
    different values.
    """
    if world_size is None:
        files = sorted(Path(out_dir).glob(RANK_FILE.format(rank="*")))
    else:
        files = [Path(out_dir) / RANK_FILE.format(rank=r) for r in range(world_size)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{out_dir}: rank files {absent} were not written")
    if not files:
        raise ValueError(f"{out_dir}: no rank*.parquet prediction files")
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).drop_duplicates()
    dup = frame[KEY].duplicated(keep=False)
    if dup.any():
        raise ValueError(f"{out_dir}: conflicting outputs for posts {frame.loc[dup, KEY].unique()[:5].tolist()}")
    have = set(frame[KEY])
    missing = [p for p in expected_post_ids if p not in have]
    extra = have - set(expected_post_ids)
    if missing or extra:
        raise ValueError(f"{out_dir}: {len(missing)} posts missing (e.g. {missing[:5]}), "
                         f"{len(extra)} unexpected (e.g. {sorted(extra)[:5]})")
    return frame.set_index(KEY).loc[expected_post_ids].reset_index()


def oof_and_test(per_fold: dict[int, pd.DataFrame], folds: pd.DataFrame) -> pd.DataFrame:
    """Per-fold outputs (every post, same columns) -> out-of-fold rows for labelled posts, fold mean otherwise.

    ``folds``: ``post_id, fold`` (NO_FOLD for unlabelled). A labelled post whose fold has no model raises.
    """
    order = folds[KEY].tolist()
    aligned = {k: f.set_index(KEY).loc[order] for k, f in per_fold.items()}
    first = next(iter(aligned.values()))
    fold = folds["fold"].to_numpy()
    out = pd.DataFrame(np.nan, index=first.index, columns=first.columns, dtype=np.float64)
    lacking = set(np.unique(fold[fold != NO_FOLD]).tolist()) - set(aligned)
    if lacking:
        raise ValueError(f"no model for folds {sorted(lacking)}: cannot give those posts out-of-fold outputs")
    for k, frame in aligned.items():
        rows = fold == k
        out.loc[rows] = frame.loc[rows].to_numpy(dtype=np.float64)
    unlabelled = fold == NO_FOLD
    if unlabelled.any():
        stacked = np.stack([f.loc[unlabelled].to_numpy(dtype=np.float64) for f in aligned.values()])
        out.loc[unlabelled] = stacked.mean(0)
    return out.reset_index()
