"""A 2-process DDP run (CPU, gloo, launched with torchrun) over shards finishes an epoch with equal batch counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.folds import fold_table, write_folds
from datamodules.shards import build_vocab, write_shards
from datamodules.smpd import read_smpd
from datamodules.synthetic import generate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_process_ddp_over_shards_equal_batches(tmp_path):
    raw = tmp_path / "raw"
    generate(raw, 90, 10, seed=0, n_subcategories=4)
    posts = read_smpd(raw)
    train = posts[posts.split == "train"]
    vocab = build_vocab(train)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    write_folds(fold_table(posts, 3, 0), tmp_path / "folds.parquet")
    write_shards(train, raw, tmp_path / "shards", split="train", class_ids=vocab, shard_size=20)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
         str(ROOT / "tests" / "ddp_shards_script.py"), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text())["batches"] for r in (0, 1)]
    # 60 training posts (folds 1, 2), global batch 8 -> 4 per rank: ceil(60 / 8) = 8 batches per rank
    assert counts == [8, 8]
