"""Posts -> WebDataset shards -> reader pipelines (the production code, on tiny shards written on the fly)."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from popstack.datamodules.schema import IMAGE_MISSING, IMAGE_OK, IMAGE_UNREADABLE
from popstack.datamodules.shards import (
    BLANK_RGB,
    Collate,
    KeepPosts,
    SampleDecoder,
    SharedEpoch,
    batches_per_rank,
    build_vocab,
    make_eval_pipeline,
    make_loader,
    make_split_eval_pipeline,
    make_train_pipeline,
    read_index,
    shard_urls,
    slot_quota,
    write_shards,
)
from popstack.lightning_modules.backbone import TINY_MODEL, register_local_configs

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


def train_epoch(out, keep_ids, *, world, workers, batch_size, epoch_value=0, seed=0):
    """The batches of every rank of one training epoch, simulated rank by rank (workers are real processes)."""
    dec, col = decoder_and_collate()
    ranks = []
    for rank in range(world):
        pipe = make_train_pipeline(shard_urls(out, ["train"]), decoder=dec, collate=col, batch_size=batch_size,
                                   num_workers=workers, seed=seed, epoch=SharedEpoch(epoch_value),
                                   keep=KeepPosts(keep_ids), shuffle_buffer=8, rank=rank, world_size=world)
        loader = make_loader(pipe, workers)
        batches = [b["post_id"] for b in loader]
        assert len(loader) == len(batches) == batches_per_rank(len(keep_ids), batch_size, world, workers)
        ranks.append(batches)
    return ranks


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 2), (4, 0)])
def test_training_epoch_visits_every_post_once_with_equal_batches_per_rank(shard_setup, world, workers):
    """17 kept posts of 5 shards (uneven: one fold held out): every post once per epoch across ranks and workers,
    fewer than world x workers repeats to even the slots out, and every rank the same batches (same sizes)."""
    posts, _, out, _ = shard_setup
    keep_ids = posts.post_id[:17].tolist()
    ranks = train_epoch(out, keep_ids, world=world, workers=workers, batch_size=3)
    seen = [pid for batches in ranks for b in batches for pid in b]
    counts = pd.Series(seen).value_counts()
    assert set(counts.index) == set(keep_ids)
    slots = world * max(1, workers)
    assert counts.sum() - len(keep_ids) < slots and counts.max() <= 2
    sizes = [[len(b) for b in batches] for batches in ranks]
    assert all(s == sizes[0] for s in sizes) and min(sizes[0]) > 1


def test_training_epoch_every_post_once_when_ranks_outnumber_shards(shard_setup):
    """Ranks x workers (8) above the shards (5): every rank still trains, on its share of the posts."""
    posts, _, out, _ = shard_setup
    ranks = train_epoch(out, posts.post_id.tolist(), world=4, workers=2, batch_size=2)
    assert all(len(batches) == len(ranks[0]) > 0 for batches in ranks)
    seen = {pid for batches in ranks for b in batches for pid in b}
    assert seen == set(posts.post_id)


def test_training_order_changes_with_epoch_and_is_reproducible(shard_setup):
    posts, _, out, _ = shard_setup
    ids = posts.post_id.tolist()

    def order(epoch_value):
        return train_epoch(out, ids, world=1, workers=0, batch_size=4, epoch_value=epoch_value, seed=1)[0]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(p for b in order(1) for p in b) == sorted(ids)  # a new order, the same posts


def test_slot_quota_never_leaves_a_single_post_batch():
    assert slot_quota(24, 4, 4) == 6
    assert slot_quota(17, 4, 4) == 6  # ceil(17 / 4) = 5 = 4 + 1: one more
    assert batches_per_rank(17, 4, 2, 2) == 4


def test_split_eval_pipeline_gives_every_rank_posts_when_shards_are_fewer(shard_setup):
    """Validation split by post: 5 shards, 6 ranks, 2 workers each: every rank gets posts, every post once."""
    posts, _, out, _ = shard_setup
    dec, col = decoder_and_collate()
    seen, per_rank = [], []
    for rank in range(6):
        pipe = make_split_eval_pipeline(shard_urls(out, ["train"]), decoder=dec, collate=col, batch_size=4,
                                        num_workers=2, rank=rank, world_size=6)
        ids = [pid for b in make_loader(pipe, 2) for pid in b["post_id"]]
        seen.extend(ids)
        per_rank.append(len(ids))
    assert sorted(seen) == sorted(posts.post_id)
    assert per_rank == [4] * 6
    with pytest.raises(ValueError, match="cannot be shared by 30 ranks"):
        make_split_eval_pipeline(shard_urls(out, ["train"]), decoder=dec, collate=col, batch_size=4, num_workers=0,
                                 rank=0, world_size=30)


def test_post_ids_with_dots_round_trip_through_shards_and_prediction_writer(tmp_path):
    from types import SimpleNamespace

    from popstack.lightning_modules.extract import KeyedPredictionWriter, merge_rank_outputs

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


def test_shard_keys_read_from_headers_match_tarfile(tmp_path):
    """The header scan (pax headers included: non-ASCII and 150-character keys) gives tarfile's member names, and
    the keys in order, without reading a member."""
    import tarfile

    from popstack.datamodules.shards import _plain_member_names, encode_key, shard_keys

    ids = ["12.5", "ü.jpg", "x" * 150, "7", "50%"]
    rows = [{"post_id": pid, "uid": "u@N01", "split": "train", "row": i, "image_relpath": "none",
             "image_status": IMAGE_MISSING, "category": "Animal", "subcategory": "Cats", "concept": "c",
             "title": "t", "alltags": "", "label": 1.0} for i, pid in enumerate(ids)]
    posts = pd.DataFrame(rows)
    write_shards(posts, tmp_path, tmp_path / "shards", split="train", class_ids=build_vocab(posts), shard_size=3)
    urls = shard_urls(tmp_path / "shards", ["train"])
    for url in urls:
        with tarfile.open(url) as tar:
            assert _plain_member_names(url) == [m.name for m in tar]
    assert [k for url in urls for k in shard_keys(url)] == [encode_key(p) for p in ids]
