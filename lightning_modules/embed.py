"""The frozen-backbone embedding cache: CLIP features of every post, computed once, reused by every fold/epoch.

Read it with ``datamodules.cached.load_embedding_cache``. Files in the cache directory (rows in ``post_ids.json``
order = ``posts.parquet`` order):
``image_emb.npy`` (n, D) float32, ``text_emb.npy`` (n, D) float32, ``text_tokens.npy`` (n, L, D) float16,
``text_mask.npy`` (n, L) bool, ``has_image.npy`` (n,) bool, ``post_ids.json``.
Large arrays are written through ``np.lib.format.open_memmap``, so memory stays flat at SMPD scale.

Many ranks build one cache together (``pipeline.neural.build_cache``): rank 0 allocates the arrays in the one
temporary folder ``<cache>.partial`` (``allocate_cache``), every rank writes the rows of its own posts there
(``open_cache_arrays`` + ``encode_into``) and lists them in ``rank<r>.done.json``, and ``finish_cache`` checks that
every post was written exactly once before renaming the folder into place.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from datamodules.atomic import atomic_write_text
from datamodules.progress import progress as progress_bar
from lightning_modules.backbone import encode_posts

#: Cache arrays: name -> (dtype, shape after the row dimension; "d" = CLIP dim, "l" = kept token positions).
CACHE_ARRAYS: dict[str, tuple[type, tuple[str, ...]]] = {
    "image_emb": (np.float32, ("d",)),
    "text_emb": (np.float32, ("d",)),
    "text_tokens": (np.float16, ("l", "d")),
    "text_mask": (np.bool_, ("l",)),
    "has_image": (np.bool_, ()),
}
#: What each rank writes next to the arrays when it has encoded its share: the post ids it wrote, in order.
RANK_DONE = "rank{rank}.done.json"


def partial_dir(out_dir: str | Path) -> Path:
    """The one temporary folder of a cache being built (shared by every rank), renamed to ``out_dir`` at the end."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def allocate_cache(tmp: str | Path, n: int, embed_dim: int, token_positions: int) -> dict[str, np.ndarray]:
    """Create the cache arrays for ``n`` posts (memory-mapped ``.npy`` files in ``tmp``) and return them."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    sizes = {"d": int(embed_dim), "l": int(token_positions)}
    return {name: np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, (n, *(sizes[a] for a in dims)))
            for name, (dtype, dims) in CACHE_ARRAYS.items()}


def open_cache_arrays(tmp: str | Path) -> dict[str, np.ndarray]:
    """The arrays ``allocate_cache`` created, opened for writing (another rank's rows stay untouched)."""
    return {name: np.load(Path(tmp) / f"{name}.npy", mmap_mode="r+") for name in CACHE_ARRAYS}


def encode_into(
    model: nn.Module,
    batches: Iterable[dict],
    arrays: dict[str, np.ndarray] | Callable[[dict], dict[str, np.ndarray]],
    index: dict[str, int],
    *,
    token_len: int,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[str]:
    """Encode raw batches (``post_id``, ``image``, ``text_ids``, ``has_image``) into the rows ``index[post_id]``.

    ``arrays``: the cache arrays, or a function of the first batch's encoding that allocates them. Returns the
    post ids written, in order; an unknown id, or one seen twice in these batches, raises ``ValueError``.
    """
    seen: set[str] = set()
    written: list[str] = []
    model = model.to(device).eval()
    amp = torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype) if autocast_dtype \
        else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for batch in progress_bar(batches, desc="embedding cache", unit="batch", enabled=progress):
            rows = []
            for pid in batch["post_id"]:
                if pid not in index:
                    raise ValueError(f"embedding cache: post {pid} is not in the posts table")
                if pid in seen:
                    raise ValueError(f"embedding cache: post {pid} appears twice in the batches")
                seen.add(pid)
                rows.append(index[pid])
            enc = encode_posts(model, batch["image"].to(device), batch["text_ids"].to(device), token_len)
            if callable(arrays):
                arrays = arrays(enc)
            rows_arr = np.asarray(rows)
            for key in ("image_emb", "text_emb", "text_tokens", "text_mask"):
                arrays[key][rows_arr] = enc[key].float().cpu().numpy() if key != "text_mask" else enc[key].cpu().numpy()
            arrays["has_image"][rows_arr] = batch["has_image"].cpu().numpy()
            written.extend(batch["post_id"])
    if not callable(arrays):
        for arr in arrays.values():
            arr.flush()
    return written


def finish_cache(tmp: str | Path, out_dir: str | Path, post_ids: list[str], written: Iterable[list[str]]) -> Path:
    """Check that the parts ``written`` (post ids per rank) hold every post of ``post_ids`` exactly once, then
    write ``post_ids.json`` and rename ``tmp`` to ``out_dir``. Raises ``ValueError`` naming missing or duplicate
    posts."""
    index = {pid: i for i, pid in enumerate(post_ids)}
    count = np.zeros(len(post_ids), dtype=np.int64)
    for part in written:
        rows = [index[p] for p in part if p in index]
        if len(rows) != len(part):
            unknown = [p for p in part if p not in index][:5]
            raise ValueError(f"embedding cache: posts {unknown} are not in the posts table")
        np.add.at(count, np.asarray(rows, dtype=np.int64), 1)
    if (count > 1).any():
        dup = [post_ids[i] for i in np.flatnonzero(count > 1)[:5]]
        raise ValueError(f"embedding cache: posts encoded more than once, e.g. {dup}")
    if (count == 0).any():
        missing = [post_ids[i] for i in np.flatnonzero(count == 0)[:5]]
        raise ValueError(f"embedding cache: {int((count == 0).sum())} posts never came out of the batches, "
                         f"e.g. {missing}")
    tmp, out_dir = Path(tmp), Path(out_dir)
    for done in tmp.glob(RANK_DONE.format(rank="*")):
        done.unlink()
    atomic_write_text(tmp / "post_ids.json", json.dumps(post_ids))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


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
    """One process: encode raw batches (``post_id``, ``image``, ``text_ids``, ``has_image``) into the cache at
    ``out_dir``.

    Rows are placed by post id, whatever order the batches come in; a post missing at the end, a duplicate or
    an unknown id raises ``ValueError`` naming it. Files are written under a temporary folder and renamed.
    (Many ranks: ``pipeline.neural.build_cache`` calls the same pieces, each rank encoding its share.)
    """
    tmp = partial_dir(out_dir)
    n = len(post_ids)

    def allocate(enc: dict) -> dict[str, np.ndarray]:
        return allocate_cache(tmp, n, enc["image_emb"].shape[1], enc["text_tokens"].shape[1])

    written = encode_into(model, batches, allocate, {pid: i for i, pid in enumerate(post_ids)},
                          token_len=token_len, device=device, autocast_dtype=autocast_dtype, progress=progress)
    return finish_cache(tmp, out_dir, post_ids, [written])
