"""Posts -> WebDataset shards -> reader pipelines (the production code, on tiny shards written on the fly)."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from datamodules.schema import IMAGE_MISSING, IMAGE_OK, IMAGE_UNREADABLE
from datamodules.shards import (
    BLANK_RGB,
    Collate,
    KeepPosts,
    SampleDecoder,
    SharedEpoch,
    build_vocab,
    make_eval_pipeline,
    make_loader,
    make_train_pipeline,
    read_index,
    shard_urls,
    write_shards,
)
from lightning_modules.backbone import TINY_MODEL, register_local_configs

N = 24


@pytest.fixture(scope="module")
def shard_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        rel = f"train/u{i % 5}@N01/{1000 + i}.jpg"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, format="JPEG")
        data = buf.getvalue()
        status = IMAGE_OK
        if i == 3:
            status = IMAGE_MISSING  # the reader found no file
        elif i == 5:
            path.write_bytes(data[: len(data) // 4])  # truncated JPEG
        else:
            path.write_bytes(data)
        rows.append({"post_id": str(1000 + i), "uid": f"u{i % 5}@N01", "split": "train", "row": i,
                     "image_relpath": rel, "image_status": status, "category": "Animal",
                     "subcategory": ["Cats", "Dogs", "Fish"][i % 3], "concept": "c", "title": f"title {i}",
                     "alltags": "tag1 tag2" if i % 2 else "", "label": float(i) / 2})
    posts = pd.DataFrame(rows)
    vocab = build_vocab(posts)
    out = tmp_path_factory.mktemp("shards")
    info = write_shards(posts, root, out, split="train", class_ids=vocab, shard_size=5)
    register_local_configs()
    return posts, vocab, out, info


def decoder_and_collate():
    return SampleDecoder(64, "title+alltags"), Collate(open_clip.get_tokenizer(TINY_MODEL))


def test_shards_written_atomically_with_index(shard_setup):
    posts, _, out, info = shard_setup
    assert info.shards == [f"train-{i:06d}.tar" for i in range(5)]
    assert info.counts == [5, 5, 5, 5, 4] and info.total == N
    assert not list(out.glob("*.tmp"))
    assert read_index(out, "train")["total"] == N
    assert info.image_status["1003"] == IMAGE_MISSING
    assert info.image_status["1005"] == IMAGE_UNREADABLE
    assert info.image_status["1000"] == IMAGE_OK


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_pipeline_every_post_exactly_once_across_ranks(shard_setup, workers):
    posts, _, out, _ = shard_setup
    dec, col = decoder_and_collate()
    seen = []
    for rank in range(2):
        pipe = make_eval_pipeline(shard_urls(out, ["train"]), decoder=dec, collate=col, batch_size=4,
                                  rank=rank, world_size=2)
        for batch in make_loader(pipe, workers):
            seen.extend(batch["post_id"])
    assert sorted(seen) == sorted(posts.post_id)


def test_batch_content_and_blank_fallback(shard_setup):
    posts, vocab, out, _ = shard_setup
    dec, col = decoder_and_collate()
    pipe = make_eval_pipeline(shard_urls(out, ["train"]), decoder=dec, collate=col, batch_size=N, rank=0,
                              world_size=1)
    batch = next(iter(make_loader(pipe, 0)))
    assert batch["image"].shape == (N, 3, 64, 64) and batch["image"].dtype == torch.uint8  # normalised on the device
    assert batch["text_ids"].shape == (N, 77) and batch["text_ids"].dtype == torch.int64
    i = batch["post_id"].index("1003")
    j = batch["post_id"].index("1005")
    assert not batch["has_image"][i] and not batch["has_image"][j]
    blank = torch.tensor(BLANK_RGB, dtype=torch.uint8).view(3, 1, 1)  # the mean colour: ~0 once normalised
    assert torch.all(batch["image"][i] == blank) and torch.all(batch["image"][j] == blank)
    k = batch["post_id"].index("1004")
    assert batch["has_image"][k] and batch["image"][k].abs().sum() > 0
    assert batch["label"][k] == pytest.approx(2.0)
    assert batch["subcategory_id"][k] == vocab["subcategory"].index("Dogs")
    expected = open_clip.get_tokenizer(TINY_MODEL)(["title 4"])[0]
    assert torch.equal(batch["text_ids"][k], expected)


def test_training_pipeline_equal_batches_per_rank_and_worker(shard_setup):
    posts, _, out, _ = shard_setup
    dec, col = decoder_and_collate()
    keep_ids = posts.post_id[:17].tolist()  # an uneven training set (e.g. one fold held out)
    counts = []
    for rank in range(2):
        pipe = make_train_pipeline(shard_urls(out, ["train"]), decoder=dec, collate=col, batch_size=3,
                                   num_samples=len(keep_ids), num_workers=2, seed=0, epoch=SharedEpoch(),
                                   keep=KeepPosts(keep_ids), shuffle_buffer=8, rank=rank, world_size=2)
        batches = list(make_loader(pipe, 2))
        counts.append(len(batches))
        assert all(len(b["post_id"]) == 3 for b in batches)
        assert set(pid for b in batches for pid in b["post_id"]) <= set(keep_ids)
    # ceil(17 / (3 * 2)) = 3 batches per rank -> ceil(3 / 2) = 2 per worker -> 4 per rank
    assert counts == [4, 4]


def test_training_order_changes_with_epoch_and_is_reproducible(shard_setup):
    _, _, out, _ = shard_setup
    dec, col = decoder_and_collate()

    def order(epoch_value):
        epoch = SharedEpoch(epoch_value)
        pipe = make_train_pipeline(shard_urls(out, ["train"]), decoder=dec, collate=col, batch_size=4,
                                   num_samples=N, num_workers=0, seed=1, epoch=epoch, rank=0, world_size=1)
        return [pid for b in make_loader(pipe, 0) for pid in b["post_id"]]

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_post_ids_with_dots_round_trip_through_shards_and_prediction_writer(tmp_path):
    from types import SimpleNamespace

    from lightning_modules.extract import KeyedPredictionWriter, merge_rank_outputs

    ids = ["12.5", "a.b.c", "50%", "x%2Ey", "ü.jpg", "7"]
    root = tmp_path / "raw"
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), 128, dtype=np.uint8)).save(buf, format="JPEG")
    rows = []
    for i, pid in enumerate(ids):
        rel = f"train/u@N01/{pid}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(buf.getvalue())
        rows.append({"post_id": pid, "uid": "u@N01", "split": "train", "row": i, "image_relpath": rel,
                     "image_status": IMAGE_OK, "category": "Animal", "subcategory": "Cats", "concept": "c",
                     "title": f"title {i}", "alltags": "", "label": float(i)})
    posts = pd.DataFrame(rows)
    write_shards(posts, root, tmp_path / "shards", split="train", class_ids=build_vocab(posts), shard_size=4)
    register_local_configs()
    dec, col = decoder_and_collate()
    pipe = make_eval_pipeline(shard_urls(tmp_path / "shards", ["train"]), decoder=dec, collate=col, batch_size=4,
                              keep=KeepPosts(ids[:5]), rank=0, world_size=1)
    writer = KeyedPredictionWriter(tmp_path / "pred")
    for batch in make_loader(pipe, 0):
        assert batch["has_image"].all()
        writer.write_on_batch_end(None, None, {"post_id": batch["post_id"], "y": batch["label"]}, None, batch, 0, 0)
    writer.write_on_epoch_end(SimpleNamespace(global_rank=0), None, [], [])
    merged = merge_rank_outputs(tmp_path / "pred", ids[:5])
    assert merged.post_id.tolist() == ids[:5]
    assert merged.y.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
