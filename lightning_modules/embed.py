"""The frozen-backbone embedding cache: CLIP features of every post, computed once, reused by every fold/epoch.

Read it with ``datamodules.cached.load_embedding_cache``. Files in the cache directory (rows in ``post_ids.json`` order = ``posts.parquet`` order):
``image_emb.npy`` (n, D) float32, ``text_emb.npy`` (n, D) float32, ``text_tokens.npy`` (n, L, D) float16,
``text_mask.npy`` (n, L) bool, ``has_image.npy`` (n,) bool, ``post_ids.json``.
Large arrays are written through ``np.lib.format.open_memmap``, so memory stays flat at SMPD scale.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_modules.backbone import encode_posts



def compute_embedding_cache(
    model: nn.Module,
    batches: Iterable[dict],
    out_dir: str | Path,
    *,
    post_ids: list[str],
    token_len: int,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Encode raw batches (``post_id``, ``image``, ``text_ids``, ``has_image``) into the cache at ``out_dir``.

    Rows are placed by post id, whatever order the batches come in; a post missing at the end, a duplicate or
    an unknown id raises ``ValueError`` naming it. Files are written under a temporary folder and renamed.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    index = {pid: i for i, pid in enumerate(post_ids)}
    n = len(post_ids)
    seen = np.zeros(n, dtype=bool)
    arrays: dict[str, np.ndarray] = {}
    model = model.to(device).eval()
    amp = torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype) if autocast_dtype \
        else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for batch in tqdm(batches, desc="embedding cache", unit="batch", disable=not progress, leave=False):
            rows = []
            for pid in batch["post_id"]:
                if pid not in index:
                    raise ValueError(f"embedding cache: post {pid} is not in the posts table")
                r = index[pid]
                if seen[r]:
                    raise ValueError(f"embedding cache: post {pid} appears twice in the batches")
                seen[r] = True
                rows.append(r)
            enc = encode_posts(model, batch["image"].to(device), batch["text_ids"].to(device), token_len)
            if not arrays:
                d = enc["image_emb"].shape[1]
                length = enc["text_tokens"].shape[1]
                arrays = {
                    "image_emb": np.lib.format.open_memmap(tmp / "image_emb.npy", "w+", np.float32, (n, d)),
                    "text_emb": np.lib.format.open_memmap(tmp / "text_emb.npy", "w+", np.float32, (n, d)),
                    "text_tokens": np.lib.format.open_memmap(tmp / "text_tokens.npy", "w+", np.float16, (n, length, d)),
                    "text_mask": np.lib.format.open_memmap(tmp / "text_mask.npy", "w+", np.bool_, (n, length)),
                    "has_image": np.lib.format.open_memmap(tmp / "has_image.npy", "w+", np.bool_, (n,)),
                }
            rows_arr = np.asarray(rows)
            for key in ("image_emb", "text_emb", "text_tokens", "text_mask"):
                arrays[key][rows_arr] = enc[key].float().cpu().numpy() if key != "text_mask" else enc[key].cpu().numpy()
            arrays["has_image"][rows_arr] = batch["has_image"].cpu().numpy()
    if not seen.all():
        missing = [post_ids[i] for i in np.flatnonzero(~seen)[:5]]
        raise ValueError(f"embedding cache: {int((~seen).sum())} posts never came out of the batches, e.g. {missing}")
    for arr in arrays.values():
        arr.flush()
    del arrays
    (tmp / "post_ids.json").write_text(json.dumps(post_ids))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
