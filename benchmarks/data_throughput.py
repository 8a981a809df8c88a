"""Samples/s through the shard eval pipeline (original bytes, and pre-sized: shorter side = the model's input, as
``data.image_short_side`` writes them) vs reading the raw JPEG files directly, with 0/1/2 workers.

    python benchmarks/data_throughput.py [--n 2000] [--size 640x480] [--image-size 224]

Every path decodes with the same ImagePreprocessor (PIL + draft + resize + centre crop, uint8 out; normalisation
happens on the model's device) and tokenizes the post text. The ceiling is the decode rate of one core times
workers.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from common import print_table, write_results


def make_data(work: Path, n: int, w: int, h: int, short_side: int | None = None):
    """``n`` JPEGs of w x h and their shards: ``shards/`` (original bytes) and, with ``short_side``, ``presized/``
    (shorter side re-encoded to ``short_side``, as ``data.image_short_side`` writes them)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from popstack.datamodules.shards import build_vocab, write_shards

    rng = np.random.default_rng(0)
    rows = []
    base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    for i in range(n):
        rel = f"train/u{i % 50}@N01/{i}.jpg"
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (work / rel).write_bytes(buf.getvalue())
        rows.append({"post_id": str(i), "uid": f"u{i % 50}@N01", "split": "train", "row": i, "image_relpath": rel,
                     "image_status": "ok", "category": "c", "subcategory": "s", "concept": "k",
                     "title": f"photo {i}", "alltags": "tag a b", "label": 5.0})
    posts = pd.DataFrame(rows)
    write_shards(posts, work, work / "shards", split="train", class_ids=build_vocab(posts), shard_size=250)
    if short_side is None:
        return posts
    start = time.perf_counter()
    write_shards(posts, work, work / "presized", split="train", class_ids=build_vocab(posts), shard_size=250,
                 image_short_side=short_side)
    print(f"pre-sized shards written in {time.perf_counter() - start:.1f} s (prepare's process pool)")
    return posts


class RawPosts:
    """Map-style dataset over raw files: what a pipeline without shards would do."""

    def __init__(self, posts, root, decoder):
        self.posts, self.root, self.decoder = posts, root, decoder

    def __len__(self):
        return len(self.posts)

    def __getitem__(self, i):
        r = self.posts.iloc[i]
        image, ok = self.decoder.preprocess((self.root / r.image_relpath).read_bytes())
        return {"post_id": r.post_id, "row": int(r.row), "image": image, "has_image": ok, "text": r.title,
                "subcategory_id": 0, "category_id": 0, "label": 5.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--size", default="640x480")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", default="0,1,2")
    a = p.parse_args()
    import open_clip
    import torch

    from popstack.datamodules.shards import Collate, SampleDecoder, make_eval_pipeline, make_loader, shard_urls

    torch.set_num_threads(1)
    w, h = map(int, a.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        posts = make_data(work, a.n, w, h, a.image_size)
        decoder = SampleDecoder(a.image_size, "title")
        collate = Collate(open_clip.get_tokenizer("ViT-B-32"))
        for workers in map(int, a.workers.split(",")):
            rates = {}
            for folder in ("shards", "presized"):
                urls = shard_urls(work / folder, ["train"])
                start = time.perf_counter()
                n = sum(len(b["post_id"]) for b in make_loader(make_eval_pipeline(
                    urls, decoder=decoder, collate=collate, batch_size=64, rank=0, world_size=1), workers))
                rates[folder] = n / (time.perf_counter() - start)
            loader = torch.utils.data.DataLoader(RawPosts(posts, work, decoder), batch_size=64, num_workers=workers,
                                                 collate_fn=collate)
            start = time.perf_counter()
            n = sum(len(b["post_id"]) for b in loader)
            raw_rate = n / (time.perf_counter() - start)
            rows.append({"workers": workers, "shards_samples_per_s": round(rates["shards"], 1),
                         "presized_shards_samples_per_s": round(rates["presized"], 1),
                         "raw_files_samples_per_s": round(raw_rate, 1)})
    print_table(rows, f"eval pipeline, {a.n} JPEGs of {a.size} -> {a.image_size} px uint8 (+ tokenizer)")
    write_results("data_throughput", {"n": a.n, "size": a.size, "image_size": a.image_size, "rows": rows})


if __name__ == "__main__":
    main()
