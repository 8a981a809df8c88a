#!/usr/bin/env bash
# GPU check: one command, on a machine with CUDA GPUs, from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: outputs/gpu_check
#
# Runs three debug-size train.py runs with bf16-mixed and prints, for each, the wall time of the neural and
# extract stages, training throughput (post-epochs/s over all modules and folds), extraction throughput
# (post predictions/s) and the peak GPU memory (MiB, sampled by nvidia-smi every 200 ms, max over GPUs):
#   1. trainer=gpu                       one GPU, frozen backbone, the embedding-cache path
#   2. trainer=ddp devices=<all GPUs>    DDP on every visible GPU (Lightning starts the processes)
#   3. trainer=gpu trainable_last_blocks=1   the shard-training path: every module trains on images read from the
#                                        WebDataset shards, the last CLIP block of each tower fine-tuning
# Data: the synthetic generator at 2,000 train + 500 test posts; backbone: the tiny CLIP (no download).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${1:-outputs/gpu_check}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then
    echo "gpu_check: no CUDA GPU visible (torch.cuda.device_count() = 0)" >&2
    exit 1
fi
mkdir -p "$OUT"
export WANDB_MODE=offline
COMMON=(debug=fast logger=none "paths.root_dir=$OUT" data.synthetic.n_train=2000 data.synthetic.n_test=500
        data.shard_size=500 data.num_workers=4 model.prompt_prototype.epochs=2 model.co_attention.epochs=2
        model.hierarchical.epochs=2 "stages=[prepare,features,neural,extract]")

run() {  # run NAME OVERRIDES... : one train.py run with nvidia-smi sampling GPU memory alongside
    local name=$1; shift
    rm -rf "$OUT/$name"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$name.mem" &
    local smi=$!
    local start=$(date +%s.%N)
    $PY train.py "${COMMON[@]}" "hydra.run.dir=$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 || {
        kill "$smi"; echo "gpu_check: $name failed, see $OUT/$name.log" >&2; tail -20 "$OUT/$name.log" >&2; exit 1; }
    local end=$(date +%s.%N)
    kill "$smi"
    $PY - "$OUT/$name" "$OUT/$name.mem" "$name" "$start" "$end" <<'EOF'
import json, sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

run, mem, name, start, end = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
cfg = OmegaConf.load(run / "config.yaml")
manifest = {s: json.loads((run / "manifests" / f"{s}.json").read_text()) for s in ("neural", "extract")}
posts = pd.read_parquet(run / "posts.parquet", columns=["split"])
labelled = int((posts.split == "train").sum())
modules = [m for m in ("prompt_prototype", "co_attention", "hierarchical") if cfg.model[m].enabled]
folds = int(cfg.n_folds)
# each fold trains on the labelled posts outside it, for the module's epochs
post_epochs = sum(labelled * (folds - 1) / folds * folds * int(cfg.model[m].epochs) for m in modules)
predictions = len(posts) * folds * len(modules)
peak = max((int(v) for line in mem.read_text().split() for v in line.split(",") if v.strip()), default=0)
t = cfg.trainer
print(f"{name:8s} devices={t.devices} strategy={t.strategy} precision={t.precision} "
      f"trainable_last_blocks={cfg.backbone.trainable_last_blocks} | wall {end - start:6.1f} s | "
      f"neural {manifest['neural']['seconds']:6.1f} s = {post_epochs / manifest['neural']['seconds']:8.0f} post-epochs/s | "
      f"extract {manifest['extract']['seconds']:6.1f} s = {predictions / manifest['extract']['seconds']:8.0f} predictions/s | "
      f"peak GPU memory {peak} MiB")
EOF
}

echo "gpu_check: $NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
run gpu trainer=gpu
run ddp trainer=ddp "trainer.devices=$NGPU"
run shards trainer=gpu backbone.trainable_last_blocks=1
