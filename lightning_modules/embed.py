"""The frozen-backbone embedding cache: CLIP features of every post, computed once, reused by every fold/epoch.

Read it with ``datamodules.cached.load_embedding_cache``. Files in the cache directory (rows in ``post_ids.json``
order = ``posts.parquet`` order):
``image_emb.npy`` (n, D) float32, ``text_emb.npy`` (n, D) float32, ``text_tokens.npy`` (n, L, D) float16,
``text_mask.npy`` (n, L) bool, ``has_image.npy`` (n,) bool, ``post_ids.json``; with an image-token grid g > 0
also ``image_tokens.npy`` (n, g * g, D) float16: the last layer's projected patch tokens
(``lightning_modules.backbone.encode_image_tokens``), what the co-attention MLP attends over.
A dataset without a readable image (``datamodules.schema.any_image_readable``) gets no image encoding at all:
``image_emb.npy`` holds zeros (kept, so every reader sees one layout) and ``image_tokens.npy`` is not written.
Large arrays are written through ``np.lib.format.open_memmap``, so memory stays flat at SMPD scale.

Many ranks build one cache together (``pipeline.neural.build_cache``): in the one temporary folder
``<cache>.partial`` every rank writes its own posts, in the order it encodes them, to arrays of its own
(``rank<r>/``, ``allocate_cache`` + ``encode_into`` with no index) and lists them in ``rank<r>.done.json``; no two
ranks ever write to one file (on NFS, neighbouring ranks' rows sharing pages of one memory-mapped file is unsafe).
Rank 0 checks that every post was written exactly once (``check_parts``), copies the parts into the final arrays
by post id (``merge_rank_parts``) and ``finish_cache`` renames the folder into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from popstack.datamodules.atomic import atomic_write_text
from popstack.datamodules.progress import progress as progress_bar
from popstack.lightning_modules.backbone import encode_posts

#: Cache arrays: name -> (dtype, shape after the row dimension; "d" = CLIP dim, "l" = kept token positions).
CACHE_ARRAYS: dict[str, tuple[type, tuple[str, ...]]] = {
    "image_emb": (np.float32, ("d",)),
    "text_emb": (np.float32, ("d",)),
    "text_tokens": (np.float16, ("l", "d")),
    "text_mask": (np.bool_, ("l",)),
    "has_image": (np.bool_, ()),
}
#: The optional patch-token array (only with an image-token grid): name, dtype; shape (n, g * g, D).
IMAGE_TOKENS, IMAGE_TOKENS_DTYPE = "image_tokens", np.float16
#: What each rank writes next to the arrays when it has encoded its share: the post ids it wrote, in order.
RANK_DONE = "rank{rank}.done.json"
#: Each rank's own arrays (rows in the order of its ``RANK_DONE`` list) inside the temporary folder.
RANK_PART = "rank{rank}"
#: Rows copied at a time when rank 0 merges the parts (bounds its memory).
MERGE_ROWS = 8192


def partial_dir(out_dir: str | Path) -> Path:
    """The one temporary folder of a cache being built (shared by every rank), renamed to ``out_dir`` at the end."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def allocate_cache(tmp: str | Path, n: int, embed_dim: int, token_positions: int,
                   image_positions: int = 0) -> dict[str, np.ndarray]:
    """Create the cache arrays for ``n`` posts (memory-mapped ``.npy`` files in ``tmp``) and return them;
    ``image_positions`` > 0 adds ``image_tokens`` (n, image_positions, D)."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    sizes = {"d": int(embed_dim), "l": int(token_positions)}
    arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, (n, *(sizes[a] for a in dims)))
              for name, (dtype, dims) in CACHE_ARRAYS.items()}
    if image_positions > 0:
        arrays[IMAGE_TOKENS] = np.lib.format.open_memmap(tmp / f"{IMAGE_TOKENS}.npy", "w+", IMAGE_TOKENS_DTYPE,
                                                         (n, int(image_positions), int(embed_dim)))
    return arrays


def open_cache_arrays(tmp: str | Path, mode: str = "r+") -> dict[str, np.ndarray]:
    """The arrays ``allocate_cache`` created in ``tmp`` (the patch tokens when there), memory-mapped (``mode``
    ``r+``: for writing)."""
    names = [*CACHE_ARRAYS, *([IMAGE_TOKENS] if (Path(tmp) / f"{IMAGE_TOKENS}.npy").is_file() else [])]
    return {name: np.load(Path(tmp) / f"{name}.npy", mmap_mode=mode) for name in names}


def encode_into(
    model: nn.Module,
    batches: Iterable[dict],
    arrays: dict[str, np.ndarray] | Callable[[dict], dict[str, np.ndarray]],
    index: dict[str, int] | None,
    *,
    token_len: int,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    image_grid: int = 0,
    images: bool = True,
) -> list[str]:
    """Encode raw batches (``post_id``, ``image``, ``text_ids``, ``has_image``) into the rows ``index[post_id]``
    (``index`` None: rows 0, 1, 2, ... in the order the posts come, as a rank's own part of the cache).

    ``arrays``: the cache arrays, or a function of the first batch's encoding that allocates them. Returns the
    post ids written, in order; an unknown id, or one seen twice in these batches, raises ``ValueError``.
    ``image_grid`` > 0: the patch tokens too (``image_tokens``, which the arrays must then hold).
    ``images`` False (no post has a readable image): the image tower never runs and ``image_emb`` is written as
    zeros (``encode_posts``).
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
                if index is not None and pid not in index:
                    raise ValueError(f"embedding cache: post {pid} is not in the posts table")
                if pid in seen:
                    raise ValueError(f"embedding cache: post {pid} appears twice in the batches")
                seen.add(pid)
                rows.append(index[pid] if index is not None else len(seen) - 1)
            enc = encode_posts(model, batch["image"].to(device), batch["text_ids"].to(device), token_len,
                               image_grid=image_grid, images=images)
            if callable(arrays):
                arrays = arrays(enc)
            rows_arr = np.asarray(rows)
            for key in ("image_emb", "text_emb", "text_tokens", "text_mask"):
                arrays[key][rows_arr] = enc[key].float().cpu().numpy() if key != "text_mask" else enc[key].cpu().numpy()
            arrays["has_image"][rows_arr] = batch["has_image"].cpu().numpy()
            if IMAGE_TOKENS in enc:
                arrays[IMAGE_TOKENS][rows_arr] = enc[IMAGE_TOKENS].float().cpu().numpy()
            written.extend(batch["post_id"])
    if not callable(arrays):
        for arr in arrays.values():
            arr.flush()
    return written


def check_parts(post_ids: list[str], written: Iterable[list[str]]) -> None:
    """Raise ``ValueError`` naming posts that the parts ``written`` (post ids per rank) hold more than once, never,
    or that are not in ``post_ids``."""
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


def merge_rank_parts(tmp: str | Path, post_ids: list[str], written: list[list[str]], embed_dim: int,
                     token_positions: int, image_positions: int = 0) -> None:
    """Rank 0: the final arrays in ``tmp`` from every rank's part (``RANK_PART``; rank r's rows are the posts of
    ``written[r]`` in order), copied by post id ``MERGE_ROWS`` rows at a time; each part is deleted once copied."""
    check_parts(post_ids, written)
    tmp = Path(tmp)
    index = {pid: i for i, pid in enumerate(post_ids)}
    final = allocate_cache(tmp, len(post_ids), embed_dim, token_positions, image_positions)
    for rank, ids in enumerate(written):
        part_dir = tmp / RANK_PART.format(rank=rank)
        part = open_cache_arrays(part_dir, mode="r")
        if any(len(arr) != len(ids) for arr in part.values()):
            raise ValueError(f"{part_dir}: {len(ids)} posts listed but arrays of {len(part['has_image'])} rows")
        rows = np.fromiter((index[p] for p in ids), dtype=np.int64, count=len(ids))
        for start in range(0, len(ids), MERGE_ROWS):
            for name, arr in final.items():
                arr[rows[start:start + MERGE_ROWS]] = part[name][start:start + MERGE_ROWS]
        del part
        shutil.rmtree(part_dir)
    for arr in final.values():
        arr.flush()


def finish_cache(tmp: str | Path, out_dir: str | Path, post_ids: list[str], written: Iterable[list[str]]) -> Path:
    """Check that the parts ``written`` (post ids per rank) hold every post of ``post_ids`` exactly once, then
    write ``post_ids.json`` and rename ``tmp`` to ``out_dir``. Raises ``ValueError`` naming missing or duplicate
    posts."""
    check_parts(post_ids, written)
    tmp, out_dir = Path(tmp), Path(out_dir)
    for done in tmp.glob(RANK_DONE.format(rank="*")):
        done.unlink()
    atomic_write_text(tmp / "post_ids.json", json.dumps(post_ids))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir

