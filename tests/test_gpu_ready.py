"""CPU proofs of what a first run on GPU nodes needs (issue 23): the shard path's learning-rate schedule, bf16
outputs at full resolution, the device each rank picks, the global batch and the fit key's world size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from datamodules.folds import fold_table, write_folds
from datamodules.popularity import PopularityDataModule
from datamodules.shards import build_vocab, write_shards
from datamodules.smpd import read_smpd
from datamodules.synthetic import generate
from lightning_modules.backbone import TINY_MODEL, register_local_configs
from lightning_modules.regressors import CLIPHierarchicalPredictor
from tests.helpers import quiet_trainer


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """60 training posts in 3 folds, written as shards of 20."""
    tmp = tmp_path_factory.mktemp("shard_run")
    generate(tmp / "raw", 60, 6, seed=0, n_subcategories=4)
    posts = read_smpd(tmp / "raw")
    train = posts[posts.split == "train"]
    vocab = build_vocab(train)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    write_folds(fold_table(posts, 3, 0), tmp / "folds.parquet")
    write_shards(train, tmp / "raw", tmp / "shards", split="train", class_ids=vocab, shard_size=20)
    register_local_configs()
    return tmp


class RecordLR:
    """The learning rate of every optimiser step (read before the step)."""

    def __init__(self):
        self.lrs: list[float] = []

    def callback(self):
        import lightning as L

        lrs = self.lrs

        class _Record(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        return _Record()


def test_shard_path_cosine_schedule_spans_every_step_of_training(shard_run):
    """The shard loader has a length, so the cosine schedule's total is epochs x batches per epoch: the learning
    rate at step 1 is still near the base, and reaches the cosine's tail only at the last step (not 0 from step 1,
    as with a loader of unknown length)."""
    lr, epochs = 1e-2, 2
    dm = PopularityDataModule(str(shard_run / "shards"), str(shard_run / "folds.parquet"), batch_size=8,
                              image_size=64, model_name=TINY_MODEL, fold=0, seed=0)
    torch.manual_seed(0)
    module = CLIPHierarchicalPredictor(embed_dim=64, hidden=(16,), lr=lr, backbone_name=TINY_MODEL, token_len=8)
    record = RecordLR()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[record.callback()], limit_val_batches=0)
    trainer.fit(module, dm)
    per_epoch = math.ceil(len(dm.train_ids) / 8)  # one rank, no workers: every training post once per epoch
    total = epochs * per_epoch
    assert trainer.estimated_stepping_batches == total
    assert len(record.lrs) == total
    expected = [lr * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    np.testing.assert_allclose(record.lrs, expected, rtol=1e-6)
    assert record.lrs[1] > 0.95 * lr and record.lrs[2] > 0.9 * lr and 0 < record.lrs[-1] < 0.05 * lr


def test_cosine_schedule_refuses_a_loader_without_length():
    """A training loader of unknown length would make the schedule's total 1 (learning rate 0 from step 1)."""
    from torch.utils.data import DataLoader, IterableDataset

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                yield {"image_emb": torch.randn(4, 8), "text_emb": torch.randn(4, 8), "label": torch.randn(4)}

    module = CLIPHierarchicalPredictor(embed_dim=8, hidden=(4,))
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="cosine schedule needs the number of training steps"):
        trainer.fit(module, DataLoader(Endless(), batch_size=None))


def cached_batch(n: int, dim: int = 16, tokens: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image_emb": torch.randn(n, dim, generator=g), "text_emb": torch.randn(n, dim, generator=g),
            "text_tokens": torch.randn(n, tokens, dim, generator=g),
            "text_mask": torch.ones(n, tokens, dtype=torch.bool),
            "label": torch.randn(n, generator=g)}


@pytest.mark.parametrize("kind", ["hierarchical", "co_attention"])
def test_bf16_predictions_keep_their_resolution(kind):
    """Under bf16 autocast (CPU here, as on a GPU) 1,000 predictions keep at least 99% distinct values: the head
    and the de-standardisation run in float32 (bf16 put them on a 0.03-0.06 grid: 176 distinct of 1,000)."""
    from lightning_modules.regressors import CoAttentionMLPModule

    torch.manual_seed(0)
    if kind == "hierarchical":
        module = CLIPHierarchicalPredictor(embed_dim=16, hidden=(32, 8), target_mean=6.41, target_std=2.48)
    else:
        module = CoAttentionMLPModule(embed_dim=16, attn_dim=16, heads=2, hidden=(16,), target_mean=6.41,
                                      target_std=2.48)
    module.eval()
    batch = cached_batch(1000)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = module(batch)
    assert pred.dtype == torch.float32
    assert len(np.unique(pred.numpy())) >= 990


def test_prompt_similarities_are_float32_under_bf16_autocast():
    """The prompt learner's cosines (multiplied by the logit scale, ~50, before a softmax) stay float32 and equal
    the float32 computation under bf16 autocast."""
    from lightning_modules.prompt_learner import global_similarity, local_similarity

    b = cached_batch(64, dim=32)
    classes = torch.randn(10, 32)
    ref_g = global_similarity(b["text_emb"], classes)
    ref_l = local_similarity(b["text_tokens"], b["text_mask"], classes, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = global_similarity(b["text_emb"].bfloat16(), classes)
        loc = local_similarity(b["text_tokens"], b["text_mask"], classes, 0.1)
    assert g.dtype == loc.dtype == torch.float32
    torch.testing.assert_close(loc, ref_l)
    torch.testing.assert_close(g, ref_g, atol=1e-2, rtol=0)  # the input itself was rounded to bf16
