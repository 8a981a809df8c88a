"""Co-attention MLP, hierarchical predictor, Huber loss, the embedding cache and keyed extraction.

The embedding cache is built the pipeline's way: ``pipeline.neural.build_cache`` over a prepared run's shards, and,
for the small hand-made run directory below, the pieces it calls in one process (``allocate_cache``,
``encode_into`` by post id, ``finish_cache``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from popstack.datamodules.cached import EmbeddingDataModule, load_embedding_cache
from popstack.datamodules.schema import NO_FOLD
from popstack.lightning_modules.embed import allocate_cache, encode_into, finish_cache, partial_dir
from popstack.lightning_modules.extract import KeyedPredictionWriter, merge_rank_outputs, oof_and_test
from popstack.lightning_modules.losses import huber_loss
from popstack.lightning_modules.regressors import CLIPHierarchicalPredictor, CoAttention, CoAttentionMLPModule
from tests.helpers import module_args, quiet_trainer

D, L_TOK = 16, 6


def test_huber_matches_paper_eq7():
    pred = torch.tensor([0.0, 0.0, 0.0, 1.0])
    target = torch.tensor([0.5, 3.0, float("nan"), -1.0])
    delta = 2.0
    # |e| = 0.5 -> 0.5 * 0.25 = 0.125; |e| = 3 -> 2*3 - 0.5*4 = 4; NaN ignored; |e| = 2 -> 0.5 * 4 = 2
    assert huber_loss(pred, target, delta).item() == pytest.approx((0.125 + 4 + 2) / 3)


def test_coattention_shapes_and_masking():
    torch.manual_seed(0)
    block = CoAttention(D, dim=8, heads=2).eval()
    img, txt = torch.randn(4, D), torch.randn(4, D)
    patches = torch.randn(4, 9, D)
    tokens = torch.randn(4, L_TOK, D)
    mask = torch.ones(4, L_TOK, dtype=torch.bool)
    mask[:, 4:] = False
    out = block(img, patches, txt, tokens, mask)
    assert out.shape == (4, 32)
    tokens2 = tokens.clone()
    tokens2[:, 4:] = 100 * torch.randn(4, 2, D)  # masked positions change
    torch.testing.assert_close(block(img, patches, txt, tokens2, mask), out)
    tokens2[:, 1] += 1.0  # a real token changes -> the output changes
    assert not torch.allclose(block(img, patches, txt, tokens2, mask), out)


def test_coattention_attends_over_patch_tokens():
    """The image side is real tokens: changing one patch token of one post changes that post's output (and no
    other post's), with the pooled image embedding unchanged."""
    torch.manual_seed(0)
    block = CoAttention(D, dim=8, heads=2).eval()
    img, txt = torch.randn(3, D), torch.randn(3, D)
    patches, tokens = torch.randn(3, 9, D), torch.randn(3, L_TOK, D)
    mask = torch.ones(3, L_TOK, dtype=torch.bool)
    with torch.no_grad():
        out = block(img, patches, txt, tokens, mask)
        changed = patches.clone()
        changed[1, 4] += 2.0  # post 1, patch 4
        again = block(img, changed, txt, tokens, mask)
    assert not torch.allclose(again[1], out[1])
    torch.testing.assert_close(again[[0, 2]], out[[0, 2]])


def test_image_tokens_come_from_the_last_layer_and_the_cache_stores_them(tmp_path):
    from popstack.datamodules.cached import load_embedding_cache
    from popstack.lightning_modules.backbone import TINY_MODEL, encode_image_tokens, encode_posts, load_backbone

    model = load_backbone(TINY_MODEL).model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, patches = encode_image_tokens(model, images, 7)  # the tiny tower has a 4 x 4 grid: all 16 kept
        assert patches.shape == (2, 16, 64)
        torch.testing.assert_close(pooled, model.encode_image(images))
        assert encode_image_tokens(model, images, 2)[1].shape == (2, 4, 64)  # average-pooled to 2 x 2
        edited = images.clone()
        edited[0, :, :16, :16] += 1.0  # the top-left patch of image 0
        _, moved = encode_image_tokens(model, edited, 7)
    assert not torch.allclose(moved[0], patches[0]) and torch.allclose(moved[1], patches[1], atol=1e-5)
    post_ids = [f"p{i}" for i in range(N)]
    write_cache(model, raw_batches(post_ids, np.arange(N)), tmp_path / "emb", post_ids, image_grid=2)
    cache = load_embedding_cache(tmp_path / "emb")
    assert cache["image_tokens"].shape == (N, 4, 64) and cache["image_tokens"].dtype == np.float16
    batch = next(raw_batches(post_ids, np.arange(N)))
    with torch.no_grad():
        enc = encode_posts(model, batch["image"], batch["text_ids"], L_TOK, image_grid=2)
    np.testing.assert_allclose(cache["image_tokens"][:7].astype(np.float32), enc["image_tokens"].numpy(), rtol=1e-2,
                               atol=1e-2)


# ------------------------------------------------------------------ a tiny run directory with a cache
N = 40


def write_cache(model, batches, out, post_ids, token_len=L_TOK, image_grid=0):
    """The cache of ``batches`` at ``out`` as ``pipeline.neural.build_cache`` writes it in one process: arrays
    allocated for every post, rows written by post id, checked and renamed into place."""
    tmp = partial_dir(out)
    image_positions = min(image_grid, 4) ** 2  # the tiny tower's 4 x 4 patch grid
    arrays = allocate_cache(tmp, len(post_ids), 64, token_len, image_positions)
    written = encode_into(model, batches, arrays, {p: i for i, p in enumerate(post_ids)}, token_len=token_len,
                          progress=False, image_grid=image_grid)
    return finish_cache(tmp, out, post_ids, [written])


def raw_batches(post_ids, order, bs=7):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(post_ids), 3, 64, 64, generator=g)
    from popstack.lightning_modules.backbone import TINY_MODEL, load_backbone

    tok = load_backbone(TINY_MODEL).tokenizer
    ids = tok([f"post number {i}" for i in range(len(post_ids))])
    for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        yield {"post_id": [post_ids[i] for i in idx], "image": images[idx], "text_ids": ids[idx],
               "has_image": torch.tensor([i % 9 != 0 for i in idx])}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from popstack.lightning_modules.backbone import TINY_MODEL, load_backbone

    d = tmp_path_factory.mktemp("run")
    post_ids = [str(100 + i) for i in range(N)]
    labels = np.where(np.arange(N) < 30, np.linspace(2, 12, N), np.nan)
    pd.DataFrame({"post_id": post_ids, "label": labels, "subcategory": ["a", "b"] * (N // 2),
                  "category": "x"}).to_parquet(d / "posts.parquet")
    folds = np.where(np.arange(N) < 30, np.arange(N) % 3, NO_FOLD)
    pd.DataFrame({"post_id": post_ids, "fold": folds}).to_parquet(d / "folds.parquet")
    (d / "vocab.json").write_text(json.dumps({"subcategory": ["a", "b"], "category": ["x"], "concept": []}))
    pd.DataFrame({"post_id": post_ids[::-1], "t0": np.arange(N, dtype=np.float32)[::-1],
                  "t1": np.ones(N, np.float32)}).to_parquet(d / "tab.parquet")
    torch.manual_seed(0)
    model = load_backbone(TINY_MODEL).model
    order = np.random.default_rng(0).permutation(N)
    write_cache(model, raw_batches(post_ids, order), d / "emb", post_ids, image_grid=4)
    return d


def test_cache_rows_follow_posts_order(run_dir):
    from popstack.lightning_modules.backbone import TINY_MODEL, encode_posts, load_backbone

    cache = load_embedding_cache(run_dir / "emb")
    assert cache["text_tokens"].dtype == np.float16 and cache["text_tokens"].shape == (N, L_TOK, 64)
    post_ids = cache["post_ids"]
    torch.manual_seed(0)
    model = load_backbone(TINY_MODEL).model.eval()
    batch = next(raw_batches(post_ids, np.arange(N), bs=N))
    with torch.no_grad():
        enc = encode_posts(model, batch["image"], batch["text_ids"], L_TOK)
    np.testing.assert_allclose(cache["image_emb"], enc["image_emb"].numpy(), atol=1e-5)
    assert cache["has_image"].tolist() == [i % 9 != 0 for i in range(N)]


def test_cache_errors_on_missing_and_duplicate(tmp_path):
    from popstack.lightning_modules.backbone import TINY_MODEL, load_backbone

    model = load_backbone(TINY_MODEL).model
    ids = ["1", "2", "3"]
    with pytest.raises(ValueError, match="never came out"):
        write_cache(model, raw_batches(ids, np.array([0, 1])), tmp_path / "a", ids, token_len=4)
    with pytest.raises(ValueError, match="appears twice"):
        write_cache(model, raw_batches(ids, np.array([0, 1, 2, 1])), tmp_path / "b", ids, token_len=4)
    with pytest.raises(ValueError, match="not in the posts table"):
        write_cache(model, raw_batches(["1", "2", "9"], np.array([0, 1, 2])), tmp_path / "c", ids, token_len=4)


def test_pipeline_cache_holds_each_post_in_posts_order_from_the_shards(tmp_path):
    """``pipeline.neural.build_cache`` on a prepared run: one row per post of ``posts.parquet``, in its order, each
    the encoding of that post's own shard sample (read back independently), with the weights it encoded with."""
    from popstack import train
    from popstack.datamodules.shards import Collate, SampleDecoder, make_eval_pipeline, make_loader, shard_urls
    from popstack.lightning_modules.backbone import encode_posts, load_backbone
    from popstack.pipeline.layout import RunLayout
    from popstack.pipeline.neural import build_cache, image_token_grid
    from tests.helpers import compose_fast

    cfg = compose_fast(tmp_path, "stages=[prepare]")
    train(cfg)
    layout = RunLayout(cfg.run_dir)
    cache_dir = build_cache(cfg, layout)
    cache = load_embedding_cache(cache_dir)
    posts = pd.read_parquet(layout.posts)
    assert cache["post_ids"] == posts.post_id.tolist()
    grid = image_token_grid(cfg)
    assert grid > 0 and cache["image_tokens"].shape[:2] == (len(posts), grid ** 2)
    bb = load_backbone(cfg.backbone.name, None)
    bb.model.load_state_dict(torch.load(layout.backbone, map_location="cpu", weights_only=True))
    index = {p: i for i, p in enumerate(cache["post_ids"])}
    loader = make_loader(make_eval_pipeline(
        shard_urls(layout.shards, ["train", "test"]), decoder=SampleDecoder(bb.image_size, cfg.data.text_field),
        collate=Collate(bb.tokenizer), batch_size=50, rank=0, world_size=1), 0)
    seen = 0
    with torch.no_grad():
        for batch in loader:
            rows = [index[p] for p in batch["post_id"]]
            enc = encode_posts(bb.model.eval(), batch["image"], batch["text_ids"], int(cfg.backbone.token_len))
            np.testing.assert_allclose(cache["image_emb"][rows], enc["image_emb"].numpy(), atol=1e-4)
            np.testing.assert_allclose(cache["text_emb"][rows], enc["text_emb"].numpy(), atol=1e-4)
            assert cache["has_image"][rows].tolist() == batch["has_image"].tolist()
            seen += len(rows)
    assert seen == len(posts)


def datamodule(run_dir, fold, tabular=False, fields=None):
    return EmbeddingDataModule(str(run_dir / "emb"), str(run_dir / "posts.parquet"), str(run_dir / "folds.parquet"),
                               str(run_dir / "vocab.json"), fold=fold, batch_size=8,
                               tabular_path=str(run_dir / "tab.parquet") if tabular else None,
                               **({"fields": fields} if fields else {}))


def test_datamodule_folds_and_tabular_alignment(run_dir):
    dm = datamodule(run_dir, 1, tabular=True)
    assert set(dm.train_idx) & set(dm.val_idx) == set()
    assert sorted(set(dm.train_idx) | set(dm.val_idx)) == list(range(30))
    sample = dm.dataset(np.array([5]))[0]
    assert sample["post_id"] == "105" and sample["tabular"][0].item() == 5.0  # aligned by post id, not position


def fit(module, dm, tmp_path, epochs=2):
    trainer = quiet_trainer(max_epochs=epochs, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("name, cls, kw", [
    ("co_attention", CoAttentionMLPModule, {"tabular_dim": 2, "attn_dim": 8, "hidden": [8], "image_token_grid": 7}),
    ("hierarchical", CLIPHierarchicalPredictor, {"hidden": [8, 4]})])
def test_regressor_checkpoint_reproduces_predictions(run_dir, tmp_path, name, cls, kw):
    torch.manual_seed(0)
    dm = datamodule(run_dir, 0, tabular=cls is CoAttentionMLPModule, fields=getattr(cls, "cache_fields", None))
    module = cls(**module_args(name, embed_dim=64, target_mean=7.0, target_std=2.0, **kw))
    path = fit(module, dm, tmp_path)
    back = cls.load_from_checkpoint(path, weights_only=True).eval()
    module.eval()
    batch = next(iter(dm.predict_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(module(batch), back(batch), rtol=0, atol=0)


def test_writer_one_row_per_post(run_dir, tmp_path):
    dm = datamodule(run_dir, None)
    module = CLIPHierarchicalPredictor(**module_args("hierarchical", embed_dim=64, hidden=[8])).eval()
    writer = KeyedPredictionWriter(tmp_path / "pred")
    quiet_trainer(callbacks=[writer]).predict(module, dm.predict_dataloader(), return_predictions=False)
    cache = load_embedding_cache(run_dir / "emb")
    frame = merge_rank_outputs(tmp_path / "pred", cache["post_ids"])
    assert frame.post_id.tolist() == cache["post_ids"] and frame.prediction.notna().all()
    with pytest.raises(ValueError, match="missing"):
        merge_rank_outputs(tmp_path / "pred", cache["post_ids"] + ["nope"])


@pytest.mark.slow
def test_ddp_extraction_two_processes(run_dir, tmp_path):
    dm = datamodule(run_dir, None)
    module = CLIPHierarchicalPredictor(**module_args("hierarchical", embed_dim=64, hidden=[8])).eval()
    writer = KeyedPredictionWriter(tmp_path / "pred")
    trainer = quiet_trainer(devices=2, strategy="ddp_spawn", callbacks=[writer])
    trainer.predict(module, dm.predict_dataloader(), return_predictions=False)
    assert sorted(p.name for p in (tmp_path / "pred").glob("rank*.parquet")) == ["rank0.parquet", "rank1.parquet"]
    frame = merge_rank_outputs(tmp_path / "pred", load_embedding_cache(run_dir / "emb")["post_ids"])
    assert len(frame) == N and frame.post_id.is_unique


def test_oof_never_uses_the_model_that_saw_the_row():
    folds = pd.DataFrame({"post_id": list("abcde"), "fold": [0, 1, 0, 1, NO_FOLD]})
    # fold k's model outputs k for every post: a labelled post must get the output of its own fold's model
    per_fold = {k: pd.DataFrame({"post_id": list("abcde"), "prediction": float(k) + 10}) for k in (0, 1)}
    out = oof_and_test(per_fold, folds)
    assert out.prediction.tolist() == [10, 11, 10, 11, 10.5]
    with pytest.raises(ValueError, match="no model for folds"):
        oof_and_test({0: per_fold[0]}, folds)
