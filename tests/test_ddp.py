"""Many processes on CPU (gloo): DDP over shards, train.py under Lightning's launcher, torchrun and SLURM, and
predict.py --devices 2. Every launch gets a free port."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from popstack.datamodules.folds import fold_table, write_folds
from popstack.datamodules.shards import build_vocab, write_shards
from popstack.datamodules.smpd import read_smpd
from popstack.datamodules.synthetic import generate
from tests.helpers import ROOT, compose_fast, free_port, slurm_task

DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "debug=fast"]
RANK_ZERO_STAGES = ("prepare", "features", "stack", "report")


def launch(args: list[str], tmp: Path, env: dict[str, str] | None = None, timeout: int = 300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(tmp: Path, run: str, *extra: str) -> list[str]:
    return [str(ROOT / "train.py"), *DDP_CPU, f"paths.root_dir={tmp}", f"hydra.run.dir={tmp / run}", *extra]


def stage_runs(log: str, stage: str) -> int:
    return len(re.findall(rf"\[{stage}\] running", log))


def check_finished_run(run_dir: Path, log: str) -> None:
    """One submission row per test post, in file order; each rank-0 stage ran (and wrote its manifest) once."""
    posts = pd.read_parquet(run_dir / "posts.parquet")
    test_ids = posts.loc[posts.split == "test"].sort_values("row").post_id
    rows = json.loads((run_dir / "submission.json").read_text())["result"]
    assert [r["post_id"] for r in rows] == [f"post{p}" for p in test_ids]
    assert all(np.isfinite(r["popularity_score"]) for r in rows)
    for stage in RANK_ZERO_STAGES:
        assert stage_runs(log, stage) == 1, stage
    for stage in ("neural", "extract"):  # every rank takes part, to the end
        assert stage_runs(log, stage) == 2 and len(re.findall(rf"\[{stage}\] done in", log)) == 2, stage
    assert sorted(p.name for p in (run_dir / "manifests").iterdir()) == sorted(
        f"{s}.json" for s in ("prepare", "features", "neural", "extract", "stack", "report"))
    preds = pd.read_parquet(run_dir / "neural" / "predictions.parquet")
    assert preds.post_id.tolist() == posts.post_id.tolist() and preds.drop(columns="post_id").notna().all().all()


@pytest.fixture(scope="module")
def lightning_ddp_run(tmp_path_factory):
    """train.py with trainer.devices=2: Lightning starts the second process (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("ddp")
    proc = launch(train_args(tmp, "run"), tmp, {"MASTER_PORT": str(free_port())})
    return tmp, proc


@pytest.mark.slow
def test_train_py_ddp_two_processes_end_to_end(lightning_ddp_run):
    tmp, proc = lightning_ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_finished_run(tmp / "run", proc.stderr)
    # Lightning's launcher starts the second process before the embedding cache, so both encode a share
    shares = [int(n) for n in re.findall(r"embedding cache: rank \d of 2 encoded (\d+) posts", proc.stderr)]
    assert len(shares) == 2 and min(shares) > 0
    assert sum(shares) == len(pd.read_parquet(tmp / "run" / "posts.parquet"))


@pytest.mark.slow
def test_train_py_under_torchrun_end_to_end(lightning_ddp_run):
    """The same run under torchrun (both processes start together): prepare and features are reused from the
    finished run, so this exercises the rank waits, the cache split, training, extraction and the stack."""
    tmp, first = lightning_ddp_run
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp / "torchrun"
    shutil.copytree(tmp / "run", run)
    for rel in ("embeddings", "neural", "stack", "manifests/neural.json", "manifests/extract.json",
                "manifests/stack.json", "manifests/report.json", "submission.json"):
        p = run / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    proc = launch(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   *train_args(tmp, "torchrun")], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert stage_runs(log, "prepare") == 0 and stage_runs(log, "features") == 0  # finished earlier: both skip
    assert len(re.findall(r"\[prepare\] skipped", log)) == 1  # rank 0 checks; rank 1 waits on the manifest
    shares = [int(n) for n in re.findall(r"embedding cache: rank \d of 2 encoded (\d+) posts", log)]
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == len(pd.read_parquet(run / "posts.parquet"))
    log_once = log.replace("[prepare] skipped", "[prepare] running").replace("[features] skipped", "[features] running")
    check_finished_run(run, log_once)


@pytest.mark.slow
def test_predict_devices_2_equals_devices_1(lightning_ddp_run, tmp_path):
    from popstack.commands.predict import predict
    from popstack.pipeline.config import load_run_config

    tmp, first = lightning_ddp_run
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp / "run"
    raw = Path(load_run_config(run).data.root)  # the run's own raw posts, both splits
    proc = launch([str(ROOT / "predict.py"), str(run), str(raw), "--out", str(tmp_path / "two.csv"), "--devices", "2"],
                  tmp_path, {"MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = pd.read_csv(tmp_path / "two.csv", dtype={"post_id": str})
    saved = dict(os.environ)
    try:  # in this process: Lightning's DDP launcher (the run's strategy) sets LOCAL_RANK etc., which must not leak
        one = predict(run, raw, tmp_path / "one.parquet", devices=1, work_dir=tmp_path)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert two.post_id.is_unique and two.post_id.tolist() == one.post_id.tolist()
    assert len(two) == len(pd.read_parquet(run / "posts.parquet"))
    np.testing.assert_allclose(two.popularity_score.to_numpy(), one.popularity_score.to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_two_slurm_tasks_run_prepare_once_and_split_the_cache(tmp_path):
    """Two tasks with the variables srun sets: task 1 waits for task 0's prepare/features, both encode a share."""
    extra = ["stages=[prepare,features,neural]", "model.prompt_prototype.enabled=false",
             "model.co_attention.enabled=false", "model.hierarchical.enabled=false"]
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *train_args(tmp_path, "run", *extra)[1:]], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **slurm_task(task)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for task in (0, 1)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert stage_runs(logs[0], "prepare") == 1 and stage_runs(logs[1], "prepare") == 0
    assert stage_runs(logs[0], "features") == 1 and stage_runs(logs[1], "features") == 0
    n_posts = len(pd.read_parquet(tmp_path / "run" / "posts.parquet"))
    shares = [int(re.search(r"embedding cache: rank (\d) of 2 encoded (\d+) posts", log).group(2)) for log in logs]
    assert min(shares) > 0 and sum(shares) == n_posts
    assert len(json.loads((tmp_path / "run" / "embeddings" / "post_ids.json").read_text())) == n_posts


def ddp_over_shards(tmp_path: Path, shard_size: int, timeout: int = 240) -> list[dict]:
    """tests/ddp_shards_script.py under torchrun (2 ranks) on 90 training posts in 3 folds (fold 0 validates), in
    shards of ``shard_size``; each rank's counts (``rank<r>.json``)."""
    raw = tmp_path / "raw"
    generate(raw, 90, 10, seed=0, n_subcategories=4)
    posts = read_smpd(raw)
    train = posts[posts.split == "train"]
    vocab = build_vocab(train)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    write_folds(fold_table(posts, 3, 0), tmp_path / "folds.parquet")
    write_shards(train, raw, tmp_path / "shards", split="train", class_ids=vocab, shard_size=shard_size)
    proc = launch(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   str(ROOT / "tests" / "ddp_shards_script.py"), str(tmp_path)], ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_process_ddp_over_shards_equal_batches_and_synced_fine_tuning(tmp_path):
    """torchrun, PopularityDataModule, trainable_last_blocks=1: equal batches per rank (every post once per
    epoch, epoch-seeded), and the trainable CLIP blocks move in step on both ranks."""
    ranks = ddp_over_shards(tmp_path, 20)
    # 60 training posts (folds 1, 2), global batch 8 -> 4 per rank: 30 posts per rank = 8 batches per rank
    assert [r["batches"] for r in ranks] == [8, 8]
    # the trainable last blocks changed identically on both ranks (gradients are all-reduced); the rest did not
    params = [json.loads((tmp_path / f"params{r}.json").read_text()) for r in (0, 1)]
    assert any(p["trainable"] for p in params[0].values()) and not all(p["trainable"] for p in params[0].values())
    for name, p in params[0].items():
        assert p["changed"] == p["trainable"], name
        assert params[1][name]["sum"] == pytest.approx(p["sum"], rel=1e-6, abs=1e-6), name


@pytest.mark.slow
def test_two_process_ddp_validation_with_fewer_shards_than_ranks_finishes(tmp_path):
    """Every post in one shard, two ranks: validation is split by post, so both ranks validate their half of the
    fold and log its metrics (split by shard, rank 1 got no batch and rank 0 waited in the metrics' all-gather)."""
    ranks = ddp_over_shards(tmp_path, 1000, timeout=180)
    assert [r["batches"] for r in ranks] == [8, 8]
    # 30 validation posts (fold 0), 4 per rank and batch: 15 posts per rank = 4 batches each
    assert [r["val_batches"] for r in ranks] == [4, 4]
    assert all("val/loss" in r["val_metrics"] for r in ranks)


@pytest.mark.slow
def test_one_fold_over_shards_trains_the_last_clip_block_only(tmp_path):
    """trainable_last_blocks=1 sends train.py's neural stage to the shards: the last block of each CLIP tower
    changes (the optimiser holds it), every other CLIP weight stays, and the checkpoint predicts identically."""
    import torch

    from popstack import train
    from popstack.lightning_modules.backbone import text_tower
    from popstack.pipeline.layout import RunLayout
    from popstack.pipeline.neural import (
        build_cache,
        build_module,
        cache_datamodule,
        load_module,
        shard_datamodule,
        trainer_cfg,
        uses_shards,
    )
    from popstack.pipeline.training import fit_resumable

    cfg = compose_fast(tmp_path, "backbone.trainable_last_blocks=1", "stages=[prepare,features]")
    train(cfg)
    run = RunLayout(cfg.run_dir)
    build_cache(cfg, run)
    assert uses_shards(cfg, "hierarchical")
    module = build_module(cfg, run, "hierarchical", cache_datamodule(cfg, run, "hierarchical", 0))
    before = {k: v.clone() for k, v in module.clip.state_dict().items()}
    last = [module.clip.visual.transformer.resblocks[-1], text_tower(module.clip).transformer.resblocks[-1]]
    chosen = {id(p) for block in last for p in block.parameters()}
    data = shard_datamodule(cfg, run, "hierarchical", 0)
    best = fit_resumable(module, data, tmp_path / "fold0", trainer_cfg=trainer_cfg(cfg), max_epochs=1,
                         monitor="val/mae", mode="min", seed=0, progress_bar=False)
    held = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    after = module.clip.state_dict()
    for name, param in module.clip.named_parameters():
        trainable = id(param) in chosen
        assert param.requires_grad == trainable and (id(param) in held) == trainable, name
        changed = not torch.equal(before[name], after[name])
        assert changed == trainable, name
    module.eval()
    reloaded = load_module("hierarchical", best).eval()
    batch = next(iter(shard_datamodule(cfg, run, "hierarchical", None).predict_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), module(batch), rtol=0, atol=1e-6)
