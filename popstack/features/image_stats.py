"""Image-statistics family: cheap pixel and file statistics per post, read from the run's WebDataset shards.

Common in SMP solutions and complementary to CLIP: a random-weight (or frozen) CLIP barely encodes colour and
exposure. Per image (decoded with ``Image.draft`` to at most ``STATS_SIDE`` pixels on the longer side first):

* ``red``, ``green``, ``blue``: mean channel values in [0, 1];
* ``brightness``: mean luma (ITU-R 601) in [0, 1]; ``contrast``: its standard deviation;
* ``saturation``: mean HSV saturation in [0, 1];
* ``colourfulness``: Hasler and Suesstrunk's metric on 0..255 channels (0 = grey; ~100 = very colourful);
* ``hue_0`` .. ``hue_{HUE_BINS-1}``: saturation-weighted hue histogram, summing to 1 (0 for grey images);
* ``sharpness``: log1p of the variance of the 4-neighbour Laplacian of the luma (0..255 scale);
* ``width``, ``height``: pixels of the stored image; ``aspect``: width / height; ``file_kb``: JPEG bytes / 1024;
* ``has_image``: 1 when the image decoded, else 0 (and every other column NaN).

Nothing is fitted: the family is a pure function of each post's image, so train and new posts get the same.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from popstack.features.families import IMAGE_STATS, column_name

STATS_SIDE = 128
HUE_BINS = 8
PIXEL_STATS = ("red", "green", "blue", "brightness", "contrast", "saturation", "colourfulness",
               *(f"hue_{k}" for k in range(HUE_BINS)), "sharpness")
FILE_STATS = ("width", "height", "aspect", "file_kb")
COLUMNS = (*PIXEL_STATS, *FILE_STATS, "has_image")


def image_statistics(data: bytes) -> dict[str, float] | None:
    """One JPEG's statistics (see the module docstring); None when the bytes do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            im.draft("RGB", (STATS_SIDE, STATS_SIDE))
            im = im.convert("RGB")
            if max(im.size) > STATS_SIDE:
                im.thumbnail((STATS_SIDE, STATS_SIDE))
            rgb = np.asarray(im, dtype=np.float32) / 255.0  # (h, w, 3)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    hi, lo = rgb.max(-1), rgb.min(-1)
    chroma = hi - lo
    sat = np.where(hi > 0, chroma / np.maximum(hi, 1e-6), 0.0)
    rg, yb = 255 * (r - g), 255 * (0.5 * (r + g) - b)
    colourful = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    hue = _hue(r, g, b, hi, chroma)
    hist = np.bincount(np.minimum((hue * HUE_BINS).astype(np.int64), HUE_BINS - 1).ravel(),
                       weights=sat.ravel(), minlength=HUE_BINS)
    hist = hist / hist.sum() if hist.sum() > 0 else hist
    y = 255 * luma
    lap = (y[1:-1, :-2] + y[1:-1, 2:] + y[:-2, 1:-1] + y[2:, 1:-1] - 4 * y[1:-1, 1:-1]) if min(y.shape) > 2 else y
    out = {"red": r.mean(), "green": g.mean(), "blue": b.mean(), "brightness": luma.mean(),
           "contrast": luma.std(), "saturation": sat.mean(), "colourfulness": colourful,
           **{f"hue_{k}": hist[k] for k in range(HUE_BINS)}, "sharpness": np.log1p(lap.var()),
           "width": width, "height": height, "aspect": width / height, "file_kb": len(data) / 1024, "has_image": 1.0}
    return {k: float(v) for k, v in out.items()}


def _hue(r: np.ndarray, g: np.ndarray, b: np.ndarray, hi: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1) per pixel (0 where chroma is 0)."""
    c = np.maximum(chroma, 1e-6)
    h = np.where(hi == r, ((g - b) / c) % 6, np.where(hi == g, (b - r) / c + 2, (r - g) / c + 4))
    return np.where(chroma > 0, h / 6.0, 0.0) % 1.0


#: Where one image sits in a shard: (tar path, byte offset of its data, byte size, post id).
ImageRef = tuple[str, int, int, str]


def shard_image_refs(shard_dir: str | Path) -> list[ImageRef]:
    """Every JPEG member of the ``*.tar`` shards under ``shard_dir`` (posts without an image are absent)."""
    refs: list[ImageRef] = []
    for path in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if ext == "jpg" and member.isfile():
                    refs.append((str(path), member.offset_data, member.size, key))
    return refs


def _statistics_of(refs: list[ImageRef]) -> list[tuple[str, dict[str, float] | None]]:
    """(post id, statistics) of each referenced image, read straight from its shard."""
    out = []
    with contextlib.ExitStack() as stack:
        files = {}
        for path, offset, size, key in refs:
            if path not in files:
                files[path] = stack.enter_context(open(path, "rb"))
            files[path].seek(offset)
            out.append((key, image_statistics(files[path].read(size))))
    return out


def shard_image_statistics(shard_dir: str | Path, workers: int | None = None) -> dict[str, dict[str, float] | None]:
    """post_id -> ``image_statistics`` of its image in the shards under ``shard_dir``; decoding is spread over
    ``workers`` processes (default: every core this process may use), each reading its images from the tar files
    itself: decoding is the family's cost (timings in benchmarks/README.md)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from popstack.datamodules.cores import available_cores

    refs = shard_image_refs(shard_dir)
    workers = max(1, min(workers or available_cores(), len(refs) // 256))  # a process per >= 256 images
    if workers == 1:
        return dict(_statistics_of(refs))
    chunks = [refs[i::workers * 4] for i in range(workers * 4)]
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver")) as pool:
        return {key: stats for part in pool.map(_statistics_of, chunks) for key, stats in part}


def image_stats_features(posts: pd.DataFrame, stats: dict[str, dict[str, float] | None] | None) -> pd.DataFrame:
    """(n posts, len(COLUMNS)) float32 in ``posts`` order; ``stats``: post_id -> ``image_statistics`` (None where
    the image did not decode; ``shard_image_statistics``), or None when no images are available: every column NaN
    and ``has_image`` 0."""
    rows = [(stats or {}).get(pid) or {"has_image": 0.0} for pid in posts["post_id"]]
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).astype(np.float32)
    frame.columns = [column_name(IMAGE_STATS, c) for c in COLUMNS]
    return frame
