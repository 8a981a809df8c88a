"""CPU proofs of what a first run on GPU nodes needs (issue 23): the shard path's learning-rate schedule, bf16
outputs at full resolution, the device each rank picks, the global batch and the fit key's world size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from popstack.datamodules.folds import fold_table, write_folds
from popstack.datamodules.popularity import PopularityDataModule
from popstack.datamodules.shards import build_vocab, write_shards
from popstack.datamodules.smpd import read_smpd
from popstack.datamodules.synthetic import generate
from popstack.lightning_modules.backbone import TINY_MODEL, register_local_configs
from popstack.lightning_modules.regressors import CLIPHierarchicalPredictor
from tests.helpers import module_args, quiet_trainer


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """30 training posts in 3 folds, written as shards of 10."""
    tmp = tmp_path_factory.mktemp("shard_run")
    generate(tmp / "raw", 30, 3, seed=0, n_subcategories=4)
    posts = read_smpd(tmp / "raw")
    train = posts[posts.split == "train"]
    vocab = build_vocab(train)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    write_folds(fold_table(posts, 3, 0), tmp / "folds.parquet")
    write_shards(train, tmp / "raw", tmp / "shards", split="train", class_ids=vocab, shard_size=10)
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
    dm = PopularityDataModule(str(shard_run / "shards"), str(shard_run / "folds.parquet"), batch_size=4,
                              image_size=64, model_name=TINY_MODEL, fold=0, seed=0)
    torch.manual_seed(0)
    module = CLIPHierarchicalPredictor(**module_args("hierarchical", embed_dim=64, hidden=[16], lr=lr,
                                                        backbone_name=TINY_MODEL, token_len=8))
    record = RecordLR()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[record.callback()], limit_val_batches=0)
    trainer.fit(module, dm)
    per_epoch = math.ceil(len(dm.train_ids) / 4)  # one rank, no workers: every training post once per epoch
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

    module = CLIPHierarchicalPredictor(**module_args("hierarchical", embed_dim=8, hidden=[4]))
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="cosine schedule needs the number of training steps"):
        trainer.fit(module, DataLoader(Endless(), batch_size=None))


def cached_batch(n: int, dim: int = 16, tokens: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image_emb": torch.randn(n, dim, generator=g), "text_emb": torch.randn(n, dim, generator=g),
            "text_tokens": torch.randn(n, tokens, dim, generator=g),
            "image_tokens": torch.randn(n, 4, dim, generator=g),
            "text_mask": torch.ones(n, tokens, dtype=torch.bool),
            "label": torch.randn(n, generator=g)}


@pytest.mark.parametrize("kind", ["hierarchical", "co_attention"])
def test_bf16_predictions_keep_their_resolution(kind):
    """Under bf16 autocast (CPU here, as on a GPU) 1,000 predictions keep at least 99% distinct values: the head
    and the de-standardisation run in float32 (bf16 put them on a 0.03-0.06 grid: 176 distinct of 1,000)."""
    from popstack.lightning_modules.regressors import CoAttentionMLPModule

    torch.manual_seed(0)
    if kind == "hierarchical":
        module = CLIPHierarchicalPredictor(**module_args("hierarchical", embed_dim=16, hidden=[32, 8],
                                                            target_mean=6.41, target_std=2.48))
    else:
        module = CoAttentionMLPModule(**module_args("co_attention", embed_dim=16, tabular_dim=0, attn_dim=16, heads=2,
                                                       hidden=[16], image_token_grid=7, target_mean=6.41,
                                                       target_std=2.48))
    module.eval()
    batch = cached_batch(1000)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = module(batch)
    assert pred.dtype == torch.float32
    assert len(np.unique(pred.numpy())) >= 990


def test_prompt_similarities_are_float32_under_bf16_autocast():
    """The prompt learner's cosines (multiplied by the logit scale, ~50, before a softmax) stay float32 and equal
    the float32 computation under bf16 autocast."""
    from popstack.lightning_modules.prompt_learner import global_similarity, local_similarity

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


class FakeCuda:
    """torch.cuda with ``count`` visible GPUs (``is_available``, ``device_count``, ``set_device`` recorded)."""

    def __init__(self, monkeypatch, count: int):
        self.current: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.current.append(int(d)))


TORCHRUN = {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "GROUP_RANK": "1", "MASTER_ADDR": "n0",
            "MASTER_PORT": "1"}


@pytest.mark.parametrize(("env", "accelerator", "devices", "expected"), [
    (TORCHRUN, "gpu", 8, 3),                                        # torchrun: LOCAL_RANK 3 -> cuda:3
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, "auto", [4, 6], 6),      # Lightning's child 1 of devices [4, 6]
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, "cuda", "5,7", 7),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "5", "SLURM_JOB_NAME": "train"}, "gpu", -1, 5),
    ({}, "gpu", 8, 0),                                              # one process (or Lightning's first)
])
def test_each_rank_takes_its_own_gpu(monkeypatch, env, accelerator, devices, expected):
    from popstack.pipeline.distributed import rank_device

    cuda = FakeCuda(monkeypatch, 8)
    assert rank_device(accelerator, devices, env) == torch.device("cuda", expected)
    assert cuda.current == [expected]  # made current: plain "cuda" tensors of this process land there too


def test_rank_device_cpu_and_errors(monkeypatch):
    from popstack.pipeline.distributed import rank_device
    from popstack.pipeline.errors import UserError

    cuda = FakeCuda(monkeypatch, 2)
    assert rank_device("cpu", 2, TORCHRUN) == torch.device("cpu")
    with pytest.raises(UserError, match="local rank 3 has no GPU"):
        rank_device("gpu", 2, TORCHRUN)
    FakeCuda(monkeypatch, 0)
    assert rank_device("auto", "auto", TORCHRUN) == torch.device("cpu") and cuda.current == []


def test_embedding_cache_encodes_on_the_rank_device(monkeypatch, tmp_path):
    """build_cache asks rank_device (this rank's GPU under a launcher) and encodes there."""
    import popstack.pipeline.neural as neural

    seen = {}

    def fake_encode(model, loader, arrays, index, *, device, **kwargs):
        seen["device"] = device
        raise RuntimeError("stop here")

    monkeypatch.setattr(neural, "rank_device", lambda accelerator, devices: torch.device("meta"))
    monkeypatch.setattr(neural, "encode_into", fake_encode)
    from popstack import train
    from tests.helpers import compose_fast

    cfg = compose_fast(tmp_path, "stages=[prepare]")
    train(cfg)
    with pytest.raises(RuntimeError, match="stop here"):
        neural.build_cache(cfg, neural.RunLayout(cfg.run_dir))
    assert seen["device"] == torch.device("meta")


@pytest.mark.parametrize(("env", "trainer", "expected"), [
    ({}, {"accelerator": "cpu", "devices": 1, "num_nodes": 1}, 1),
    ({}, {"accelerator": "cpu", "devices": 2, "num_nodes": 1}, 2),
    ({}, {"accelerator": "gpu", "devices": "auto", "num_nodes": 2}, 16),
    ({}, {"accelerator": "gpu", "devices": [0, 1, 2], "num_nodes": 1}, 3),
    (TORCHRUN, {"accelerator": "gpu", "devices": 8, "num_nodes": 2}, 16),
])
def test_planned_world_size(monkeypatch, env, trainer, expected):
    from omegaconf import OmegaConf

    from popstack.pipeline.distributed import planned_world_size

    FakeCuda(monkeypatch, 8)
    assert planned_world_size(trainer, env) == expected
    assert planned_world_size(OmegaConf.create(trainer), env) == expected  # as the run config gives it


def test_fit_key_and_stage_hash_record_the_world_size(monkeypatch, tmp_path):
    """A fold trained on 1 device is not reused on 8: the neural stage's config (its hash) and the fold key hold
    the world size; the stage's other placement keys still do not retrain."""
    from omegaconf import OmegaConf

    from popstack.pipeline.stages import neural as stage
    from tests.helpers import compose_fast

    FakeCuda(monkeypatch, 8)
    c = OmegaConf.to_container(compose_fast(tmp_path), resolve=True)

    def config(**trainer):
        return stage.config({**c, "trainer": {**c["trainer"], "accelerator": "gpu", "num_nodes": 1, **trainer}})

    one, eight = config(devices=1), config(devices=8)
    assert one["world_size"] == 1 and eight["world_size"] == 8
    assert one != eight and eight == config(devices="auto", log_every_n_steps=5)
    keys = {}
    for devices in (1, 8):
        cfg = compose_fast(tmp_path, "trainer.accelerator=gpu", f"trainer.devices={devices}")
        keys[devices] = stage.fold_key(cfg, {"folds.parquet": "abc"}, {"name": "tiny"}, "hierarchical", 0)
    assert keys[1]["world_size"] == 1 and keys[8]["world_size"] == 8
    assert {k: v for k, v in keys[1].items() if k != "world_size"} == {
        k: v for k, v in keys[8].items() if k != "world_size"}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_size_is_the_global_batch(world):
    """``model.<name>.batch_size`` is the global batch (Lightning's templates, open_clip): each of N devices loads
    batch / N, so 1 and N devices train with the same batch at the same learning rate."""
    from popstack.datamodules.shards import device_batch_size

    assert device_batch_size(64, world) * world == 64
    assert device_batch_size(10, 4, training=False) == 3  # evaluation rounds up
    with pytest.raises(ValueError, match="not divisible by the 3 devices"):
        device_batch_size(64, 3)


def test_cached_loader_batches_are_global_over_devices(tmp_path):
    """EmbeddingDataModule divides its batch by the Trainer's world size (a stand-in Trainer with 1 and 4 ranks)."""
    from types import SimpleNamespace

    from popstack.datamodules.cached import EmbeddingDataModule
    from tests.test_speed_paths import _tiny_cache

    dm = EmbeddingDataModule(*_tiny_cache(tmp_path), fold=0, batch_size=8)
    for world, per_device in ((1, 8), (4, 2)):
        dm.trainer = SimpleNamespace(world_size=world)
        assert dm.train_dataloader().batch_size == dm.predict_dataloader().batch_size == per_device
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ValueError, match="batch_size 8 .* not divisible by the 3 devices"):
        dm.train_dataloader()


def test_lightning_processes_start_early_only_under_its_script_launcher(monkeypatch):
    """start_lightning_processes starts nothing under torchrun/SLURM, for one process, or for a strategy whose
    launcher starts processes inside the Trainer (ddp_spawn); tests/test_ddp.py covers the launch itself."""
    import popstack.pipeline.distributed as dist

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    two_cpus = {"accelerator": "cpu", "devices": 2, "num_nodes": 1}
    assert not dist.start_lightning_processes({**two_cpus, "devices": 1, "strategy": "ddp"})
    assert not dist.start_lightning_processes({**two_cpus, "strategy": "ddp_spawn"})
    monkeypatch.setattr(dist, "topology", lambda env=None: dist.Topology(0, 0, 2, 0, "torchrun"))
    assert not dist.start_lightning_processes({**two_cpus, "strategy": "ddp"})
