"""WebDataset shards of posts: writing (prepare stage) and the training / evaluation reader pipelines.

Shard members per post (``__key__`` = ``encode_key(post_id)``): ``jpg`` (image bytes; absent when the image is
missing or unreadable), ``json`` (post_id, uid, split, row, title, alltags, category/subcategory/concept names and ids,
has_image, label or null) and ``cls`` (subcategory id, -1 unknown). Every split also gets ``{split}-index.json``
with its shard names and sample counts: the explicit sample count the readers need.

Training follows open_clip's recipe without resampling (``EpochSlotSamples``): the shards' keys are read once from
the tar headers; each epoch orders the shards by (seed, epoch), the same on every rank, and cuts the kept posts into
one segment per (rank, worker) slot, so an epoch visits every post once across ranks; short segments are padded
with a post or two so every slot yields ``slot_quota`` samples and every rank ``batches_per_rank`` batches (the
loader's length, from which the learning-rate schedule counts): ranks never wait on each other. A shuffle buffer
seeded by (seed, epoch, slot) mixes each slot's samples. Validation is split the same way by post, without padding
(``make_split_eval_pipeline``), so every rank gets its share however few shards there are. The embedding cache
and prediction read every shard once, split by rank then worker (``make_eval_pipeline``), and merge by post id.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from popstack.datamodules.atomic import atomic_write_json
from popstack.datamodules.schema import IMAGE_MISSING, IMAGE_OK, IMAGE_UNREADABLE, UNKNOWN_ID

log = logging.getLogger("popstack")

VOCAB_FIELDS: tuple[str, ...] = ("category", "subcategory", "concept")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- vocabulary
def build_vocab(train_posts: pd.DataFrame) -> dict[str, list[str]]:
    """Sorted training-split values per class field; a value's id is its index (unknown -> ``UNKNOWN_ID``)."""
    return {f: sorted(map(str, train_posts[f].dropna().unique())) for f in VOCAB_FIELDS}


def class_id_maps(vocab: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    return {f: {name: i for i, name in enumerate(names)} for f, names in vocab.items()}


# ----------------------------------------------------------------------------- sample keys
_KEY_UNSAFE = re.compile(r"[%./\x00-\x1f\x7f]")


def encode_key(post_id: str) -> str:
    """The tar ``__key__`` of a post. WebDataset splits a member name at the first ``.`` of its base name and
    treats ``/`` as a folder, so ``%``, ``.``, ``/`` and control characters are percent-encoded
    (``"1.5"`` -> ``"1%2E5"``; ``urllib.parse.unquote`` gives the post id back)."""
    return _KEY_UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", post_id)


# ----------------------------------------------------------------------------- writing
@dataclass
class ShardsInfo:
    """What ``write_shards`` wrote: shard file names, samples per shard, and each post's image status."""

    split: str
    shards: list[str]
    counts: list[int]
    image_status: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.counts))


def check_image(data: bytes, max_side: int | None = None, short_side: int | None = None,
                quality: int = 90) -> tuple[bytes | None, str]:
    """Decode ``data`` fully (truncated/corrupt JPEGs fail here); re-encode as JPEG (``quality``) when the image is
    larger than asked: the shorter side above ``short_side`` (the model's input size: the loaders then decode
    small images), else the longer side above ``max_side``. Never upscales.

    Returns (bytes to store or None, status).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if short_side and min(im.size) > short_side:
                scale = short_side / min(im.size)
                target = (max(short_side, round(im.size[0] * scale)), max(short_side, round(im.size[1] * scale)))
            elif max_side and max(im.size) > max_side:
                scale = max_side / max(im.size)
                target = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
            else:
                target = None
            if target is not None:
                im.draft("RGB", target)  # DCT-domain downscale towards the target first: the decode is the cost
            im.load()
            if target is not None:
                im = im.convert("RGB").resize(target, Image.Resampling.BICUBIC, reducing_gap=None)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=int(quality))
                data = buf.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, IMAGE_UNREADABLE
    return data, IMAGE_OK


def _load_image(job: tuple[str, int | None, int | None, int]) -> tuple[bytes | None, str]:
    """One image file -> (bytes to store or None, status); runs in the prepare stage's worker processes."""
    path, max_side, short_side, quality = job
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, IMAGE_MISSING
    if not data:
        return None, IMAGE_MISSING
    return check_image(data, max_side, short_side, quality)


#: Posts handed to the worker processes at a time by ``write_shards`` (bounds the bytes in flight).
WRITE_BLOCK = 2048


def write_shards(
    posts: pd.DataFrame,
    raw_root: str | Path,
    out_dir: str | Path,
    *,
    split: str,
    class_ids: dict[str, list[str]],
    shard_size: int = 5000,
    image_max_side: int | None = None,
    image_short_side: int | None = None,
    image_quality: int = 90,
    workers: int | None = None,
    progress: bool = False,
) -> ShardsInfo:
    """Stream the posts of one split into ``out_dir/{split}-%06d.tar`` (temporary name, renamed when complete).

    Args:
        posts: rows of the posts table of this split (``datamodules.schema``), in file order.
        raw_root: the raw SMPD directory; images at ``raw_root / image_relpath``.
        class_ids: ``vocab.json`` content (field -> sorted names).
        shard_size: posts per shard.
        image_short_side: re-encode images whose shorter side exceeds this many pixels to exactly that (the
            model's input size; None: see ``image_max_side``). image_max_side: otherwise re-encode images whose
            longer side exceeds this (None: keep the bytes). image_quality: JPEG quality of re-encoded images.
        workers: processes reading, checking and re-encoding the images (default: every core this process may
            use; 1 reads in this process). The tar files are written here, in post order, whatever the count.
        progress: a bar over the posts (images) written (stderr).
    """
    from popstack.datamodules.cores import available_cores

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{split}-*.tar*"):
        stale.unlink()
    maps = class_id_maps(class_ids)
    raw_root = Path(raw_root)
    info = ShardsInfo(split=split, shards=[], counts=[])
    workers = workers or max(1, min(available_cores(), len(posts) // 256))  # a process per >= 256 images

    def finished(tmp_name: str) -> None:
        final = tmp_name.removesuffix(".tmp")
        os.replace(tmp_name, final)
        info.shards.append(Path(final).name)

    def images(block: list) -> Iterator[tuple[bytes | None, str]]:
        # the reader's verdict first: a missing image, or one outside the data root, is never opened
        jobs = [(str(raw_root / rec.image_relpath), image_max_side, image_short_side, image_quality)
                for rec in block if rec.image_status == IMAGE_OK]
        done = iter(pool.map(_load_image, jobs, chunksize=max(1, len(jobs) // (4 * workers))) if pool
                    else map(_load_image, jobs))
        for rec in block:
            yield next(done) if rec.image_status == IMAGE_OK else (None, rec.image_status)

    pattern = str(out_dir / f"{split}-%06d.tar.tmp")
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver")))
        sink = stack.enter_context(wds.ShardWriter(pattern, maxcount=shard_size, post=finished, verbose=0))
        bar = stack.enter_context(tqdm(total=len(posts), desc=f"prepare {split}", unit="post",
                                       disable=not progress, leave=False))
        records = posts.itertuples(index=False)
        while block := list(itertools.islice(records, WRITE_BLOCK)):
            for rec, (jpg, status) in zip(block, images(block)):
                info.image_status[rec.post_id] = status
                label = None if pd.isna(rec.label) else float(rec.label)
                meta = {
                    "post_id": rec.post_id, "uid": rec.uid, "split": rec.split, "row": int(rec.row),
                    "title": rec.title, "alltags": rec.alltags, "has_image": jpg is not None, "label": label,
                    **{f: getattr(rec, f) for f in VOCAB_FIELDS},
                    **{f"{f}_id": maps[f].get(getattr(rec, f), UNKNOWN_ID) for f in VOCAB_FIELDS},
                }
                sample = {"__key__": encode_key(rec.post_id), "json": json.dumps(meta).encode(),
                          "cls": str(meta["subcategory_id"]).encode()}
                if jpg is not None:
                    sample["jpg"] = jpg
                sink.write(sample)
            bar.update(len(block))
    n = len(posts)
    info.counts = [min(shard_size, n - i * shard_size) for i in range(len(info.shards))]
    index = {"split": split, "shards": info.shards, "counts": info.counts, "total": info.total}
    atomic_write_json(out_dir / f"{split}-index.json", index)
    return info


def read_index(shard_dir: str | Path, split: str) -> dict:
    path = Path(shard_dir) / f"{split}-index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard index not found (run the prepare stage)")
    return json.loads(path.read_text())


def shard_urls(shard_dir: str | Path, splits: Iterable[str]) -> list[str]:
    return [str(Path(shard_dir) / name) for split in splits for name in read_index(shard_dir, split)["shards"]]


def shard_counts(shard_dir: str | Path, splits: Iterable[str]) -> list[int]:
    """Samples per shard, aligned with ``shard_urls(shard_dir, splits)``."""
    return [int(c) for split in splits for c in read_index(shard_dir, split)["counts"]]


# ----------------------------------------------------------------------------- decoding
#: The uint8 colour of a missing image: the CLIP mean, so it normalises to (almost exactly) zero.
BLANK_RGB = tuple(round(m * 255) for m in CLIP_MEAN)


class ImagePreprocessor:
    """JPEG bytes -> CLIP input (3, S, S) **uint8**: DCT-domain downscale (``Image.draft``), shorter side to S
    (bicubic), centre crop. The batch stays uint8 between processes (4x less than float32 through the loader's
    shared memory and the host-to-device copy, which ``pin_memory`` makes asynchronous) and is normalised on the
    device (``normalise_images``, called by ``lightning_modules.backbone.encode_posts``): the same numbers as
    normalising here. Shards written with ``image_short_side`` = S only need the crop. Missing/undecodable images
    -> the mean colour ``BLANK_RGB`` (about zero once normalised) and ``has_image = False``.

    (``torchvision.io.decode_jpeg`` is deprecated as of torchvision 0.29, and PIL with ``draft`` decodes within
    about 10% of it on CPU, so PIL stays the decoder.)
    """

    def __init__(self, image_size: int):
        self.size = int(image_size)

    def blank(self) -> torch.Tensor:
        return torch.tensor(BLANK_RGB, dtype=torch.uint8).view(3, 1, 1).expand(3, self.size, self.size).clone()

    def __call__(self, data: bytes | None) -> tuple[torch.Tensor, bool]:
        if not data:
            return self.blank(), False
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (self.size, self.size))
                im = im.convert("RGB")
                w, h = im.size
                if min(w, h) != self.size:
                    scale = self.size / min(w, h)
                    im = im.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                   Image.Resampling.BICUBIC)
                    w, h = im.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError):
            return self.blank(), False
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), True


def normalise_images(image: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN,
                     std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """(B, 3, S, S) uint8 batch (as the loaders deliver it) -> float32 CLIP input, on the batch's device; a float
    batch is taken as already normalised and returned unchanged."""
    if image.dtype != torch.uint8:
        return image
    m = torch.tensor(mean, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
    return (image.float().div_(255.0) - m).div_(sd)


def post_text(meta: dict, text_field: str) -> str:
    """The post text fed to CLIP: ``title``, ``alltags`` or ``title+alltags``."""
    if text_field == "title":
        return meta["title"]
    if text_field == "alltags":
        return meta["alltags"]
    if text_field == "title+alltags":
        return " ".join(t for t in (meta["title"], meta["alltags"]) if t)
    raise ValueError(f"text_field must be title, alltags or title+alltags, got {text_field!r}")


class SampleDecoder:
    """A raw tar sample -> dict of tensors/values (one post). Picklable, so it runs inside loader workers."""

    def __init__(self, image_size: int, text_field: str):
        self.preprocess = ImagePreprocessor(image_size)
        self.text_field = text_field

    def __call__(self, sample: dict) -> dict:
        meta = json.loads(sample["json"])
        image, ok = self.preprocess(sample.get("jpg"))
        return {
            "post_id": meta["post_id"],
            "row": meta["row"],
            "split": meta["split"],
            "image": image,
            "has_image": ok,
            "text": post_text(meta, self.text_field),
            "subcategory_id": meta["subcategory_id"],
            "category_id": meta["category_id"],
            "label": np.nan if meta["label"] is None else meta["label"],
        }


class Collate:
    """List of decoded samples -> the raw batch dict (see ``lightning_modules.backbone.encode_posts``)."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        return {
            "post_id": [s["post_id"] for s in samples],
            "row": torch.tensor([s["row"] for s in samples], dtype=torch.int64),
            "image": torch.stack([s["image"] for s in samples]),
            "has_image": torch.tensor([s["has_image"] for s in samples], dtype=torch.bool),
            "text_ids": self.tokenizer([s["text"] for s in samples]).long(),
            "subcategory_id": torch.tensor([s["subcategory_id"] for s in samples], dtype=torch.int64),
            "category_id": torch.tensor([s["category_id"] for s in samples], dtype=torch.int64),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.float32),
        }


class KeepPosts:
    """Sample filter by post id (fold membership): keep samples whose ``__key__`` encodes a post of ``post_ids``."""

    def __init__(self, post_ids: Iterable[str] | None):
        self.post_ids = None if post_ids is None else frozenset(map(encode_key, post_ids))

    def __call__(self, sample: dict) -> bool:
        return self.post_ids is None or sample["__key__"] in self.post_ids


# ----------------------------------------------------------------------------- shard lists
class SharedEpoch:
    """An epoch counter shared with loader workers (multiprocessing value), set at each epoch start."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class RankWorkerShardList(torch.utils.data.IterableDataset):
    """Every shard once, split by rank then by loader worker (embedding cache / prediction, merged by post id)."""

    def __init__(self, urls: list[str], rank: int, world_size: int):
        self.urls, self.rank, self.world_size = list(urls), rank, world_size

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_info()
        mine = self.urls[self.rank :: self.world_size]
        for url in mine[worker::workers]:
            yield {"url": url}


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) from the arguments, else torch.distributed, else the RANK/WORLD_SIZE environment."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def device_batch_size(batch_size: int, world_size: int, training: bool = True) -> int:
    """Posts per device of a global ``batch_size`` (the configs' convention, as in Lightning's templates and
    open_clip's total batch): training needs it divisible by ``world_size`` (``ValueError`` otherwise), so the
    optimiser sees the same batch and learning rate on 1 or N devices; evaluation rounds up."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not training:
        return math.ceil(batch_size / world_size)
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} (the global batch) is not divisible by the {world_size} devices")
    return batch_size // world_size


# ----------------------------------------------------------------------------- epoch plans (training, validation)
def shard_keys(url: str | Path) -> list[str]:
    """The sample keys of one shard, in order, from its tar headers alone (no member is read); remembered per file
    (path, size, modification time), so the folds and modules of one process scan each shard once."""
    path = Path(url)
    stat = path.stat()
    return list(_shard_keys(str(path), stat.st_size, stat.st_mtime_ns))


#: WebDataset's split of a member name into the sample key and its extension (``base_plus_ext``).
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_BLOCK = 512


@functools.lru_cache(maxsize=65536)
def _shard_keys(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    names = _plain_member_names(path)
    if names is None:  # pax / GNU headers (e.g. non-ASCII keys) or an odd file: the standard reader
        import tarfile

        with tarfile.open(path) as tar:
            names = [m.name for m in tar if m.isfile()]
    keys: list[str] = []
    for name in names:
        match = _MEMBER.match(name)
        if match and (not keys or keys[-1] != match.group(1)):
            keys.append(match.group(1))
    return tuple(keys)


def _plain_member_names(path: str) -> list[str] | None:
    """File member names read straight from the ustar headers, seeking past each member's data (no ``TarInfo``
    object per member); pax extended headers (which ``webdataset.TarWriter`` puts before every member) may rename
    the member that follows. None at any other kind of header or a damaged one, so the caller falls back."""
    names: list[str] = []
    pending: str | None = None  # a pax header's path for the next member
    with open(path, "rb") as fh:
        while True:
            header = fh.read(_BLOCK)
            if len(header) < _BLOCK:
                return None
            if header.count(0) == _BLOCK:
                return names
            kind = header[156:157]
            try:
                size = int(header[124:136].strip(b"\0 ") or b"0", 8)
                padded = -(-size // _BLOCK) * _BLOCK
                if kind in (b"x", b"g"):  # pax header: "<len> <key>=<value>\n" records
                    records = fh.read(padded)[:size]
                    if kind == b"x":
                        pending = _pax_path(records) or pending
                    continue
                if kind not in (b"0", b"\0"):
                    return None
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
            except (ValueError, UnicodeDecodeError):
                return None
            names.append(pending or (f"{prefix}/{name}" if prefix else name))
            pending = None
            fh.seek(padded, 1)


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of a pax extended header's records (lengths count bytes), if it has one."""
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def slot_quota(num_samples: int, slots: int, batch_size: int) -> int:
    """Samples every (rank, worker) slot yields per training epoch: ``ceil(num_samples / slots)``, one more when
    that would leave a last batch of a single post (a BatchNorm head cannot train on one)."""
    quota = math.ceil(num_samples / max(1, slots))
    return quota + 1 if quota > 1 and quota % batch_size == 1 else quota


def batches_per_rank(num_samples: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Training batches each rank yields per epoch (every rank the same number; the loader's length)."""
    workers = max(1, num_workers)
    return workers * math.ceil(slot_quota(num_samples, world_size * workers, batch_size) / batch_size)


class EpochSlotSamples(torch.utils.data.IterableDataset):
    """The raw samples one (rank, worker) slot reads in one epoch: every post once across the slots.

    The selected posts (``keys``: the kept keys of each shard, in shard order) form one sequence, its shards in an
    order that depends on (seed, epoch) only, so every rank computes the same sequence; the sequence is cut into
    ``world_size x workers`` contiguous segments of equal size (+-1), and a slot reads only the shards its segment
    touches. Training (``quota`` set) pads a short segment with the posts that follow it (wrapping around, as
    ``DistributedSampler`` pads) so every slot yields exactly ``quota`` samples, and shuffles them through a buffer
    seeded by (seed, epoch, slot); evaluation (``quota`` None) reads its segment in shard order.
    """

    def __init__(self, urls: list[str], keys: list[list[str]], *, rank: int, world_size: int, num_workers: int,
                 seed: int, epoch: SharedEpoch, quota: int | None = None, shuffle_buffer: int = 0):
        if len(urls) != len(keys):
            raise ValueError("one key list per shard is needed")
        self.urls, self.keys = list(urls), [list(k) for k in keys]
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.seed, self.epoch, self.quota, self.shuffle_buffer = seed, epoch, quota, shuffle_buffer

    @property
    def num_samples(self) -> int:
        return sum(map(len, self.keys))

    def positions(self, slot: int, epoch: int) -> list[tuple[int, str]]:
        """(shard index, key) of every sample ``slot`` reads in ``epoch``."""
        order = list(range(len(self.urls)))
        if self.quota is not None:
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        sequence = [(i, k) for i in order for k in self.keys[i]]
        n, slots = len(sequence), self.world_size * self.workers
        start, end = slot * n // slots, (slot + 1) * n // slots
        if self.quota is not None and n:
            end = start + self.quota
        return [sequence[p % n] for p in range(start, end)] if n else []

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_info()
        if workers != self.workers:
            raise RuntimeError(f"the epoch plan was made for {self.workers} loader workers, the loader has {workers}")
        epoch = self.epoch.get()
        slot = self.rank * self.workers + worker
        wanted: dict[int, dict[str, int]] = {}
        for shard, key in self.positions(slot, epoch):
            counts = wanted.setdefault(shard, {})
            counts[key] = counts.get(key, 0) + 1
        samples = self._read(wanted)
        if self.quota is None:
            yield from samples
            return
        yield from _buffer_shuffle(samples, self.shuffle_buffer, random.Random(f"samples-{self.seed}-{epoch}-{slot}"))

    def _read(self, wanted: dict[int, dict[str, int]]) -> Iterator[dict]:
        for shard, counts in wanted.items():  # in sequence order
            source = [{"url": self.urls[shard]}]
            for sample in wds.tariterators.tarfile_samples(source, handler=wds.warn_and_continue):
                for _ in range(counts.get(sample["__key__"], 0)):
                    yield sample


def _buffer_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Samples in a random order through a buffer of ``size`` (the whole stream when it fits)."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= max(1, size):
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def kept_keys(urls: list[str], keep: KeepPosts | None) -> list[list[str]]:
    """The keys of each shard that ``keep`` selects (all when None), read from the tar headers."""
    return [[k for k in shard_keys(url) if keep is None or keep({"__key__": k})] for url in urls]


# ----------------------------------------------------------------------------- pipelines
def make_train_pipeline(
    urls: list[str],
    *,
    decoder: SampleDecoder,
    collate: Collate,
    batch_size: int,
    num_workers: int,
    seed: int,
    epoch: SharedEpoch,
    keep: KeepPosts | None = None,
    keys: list[list[str]] | None = None,
    shuffle_buffer: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
) -> wds.DataPipeline:
    """One epoch of training batches for this rank: every kept post once across ranks and workers (open_clip's
    recipe without resampling: shards in an epoch-seeded order shared by every rank, split by rank and worker).

    Every worker of every rank yields ``slot_quota`` samples (a few posts repeat to even the slots out), so every
    rank yields ``batches_per_rank(...)`` batches of ``batch_size`` (the last of each worker may be smaller); the
    pipeline's ``len()`` says so, which is what the learning-rate schedule counts its steps from. ``keys``: the
    kept keys per shard (``kept_keys``) when the caller has them already.
    """
    rank, world_size = dist_info(rank, world_size)
    keys = kept_keys(urls, keep) if keys is None else keys
    workers = max(1, num_workers)
    n = sum(map(len, keys))
    if n == 0:
        raise ValueError(f"no training posts in the {len(urls)} shards")
    samples = EpochSlotSamples(urls, keys, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed,
                               epoch=epoch, quota=slot_quota(n, world_size * workers, batch_size),
                               shuffle_buffer=shuffle_buffer)
    pipeline = wds.DataPipeline(samples, wds.map(decoder),
                                wds.batched(batch_size, collation_fn=collate, partial=True))
    return pipeline.with_length(batches_per_rank(n, batch_size, world_size, num_workers), silent=True)


def make_split_eval_pipeline(
    urls: list[str],
    *,
    decoder: SampleDecoder,
    collate: Collate,
    batch_size: int,
    num_workers: int,
    keep: KeepPosts | None = None,
    keys: list[list[str]] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> wds.DataPipeline:
    """Evaluation split by post, not by shard (validation under DDP): every kept post once across ranks, and every
    rank gets its share (within one post of the others) however few shards there are, so no rank waits for
    another's metrics. Raises ``ValueError`` when there are fewer posts than ranks."""
    rank, world_size = dist_info(rank, world_size)
    keys = kept_keys(urls, keep) if keys is None else keys
    n = sum(map(len, keys))
    if n < world_size:
        raise ValueError(f"{n} posts to evaluate cannot be shared by {world_size} ranks (each needs one)")
    samples = EpochSlotSamples(urls, keys, rank=rank, world_size=world_size, num_workers=num_workers, seed=0,
                               epoch=SharedEpoch())
    return wds.DataPipeline(samples, wds.map(decoder), wds.batched(batch_size, collation_fn=collate, partial=True))


def make_eval_pipeline(
    urls: list[str],
    *,
    decoder: SampleDecoder,
    collate: Collate,
    batch_size: int,
    keep: KeepPosts | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> wds.DataPipeline:
    """Every post exactly once across ranks and workers, in shard order, partial last batch kept."""
    rank, world_size = dist_info(rank, world_size)
    return wds.DataPipeline(
        RankWorkerShardList(urls, rank, world_size),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.select(keep or KeepPosts(None)),
        wds.map(decoder),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )


def make_loader(pipeline: wds.DataPipeline, num_workers: int, pin_memory: bool | None = None) -> wds.WebLoader:
    """A DataLoader over a batched pipeline (batching happens in the workers), with the pipeline's length when it
    has one (the training pipeline: Lightning then knows the epoch's steps); workers persist across epochs;
    ``pin_memory`` (default: when CUDA is available) pins the uint8 batches for asynchronous host-to-device
    copies."""
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                           persistent_workers=num_workers > 0, pin_memory=pin)
    try:
        return loader.with_length(len(pipeline), silent=True)
    except TypeError:
        return loader
