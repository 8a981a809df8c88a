#!/usr/bin/env bash
# The first-GPU-run check, from the repository root of a GPU machine (about 10 minutes on one GPU):
#
#     bash benchmarks/gpu_check.sh [--out DIR] [--cpu] [--sections env,model,...]
#
# Uses the project's venv (.venv/bin/python when present, else $PY, else python3) and runs benchmarks/gpu_check.py:
# environment (torch, CUDA, driver, GPU names, /dev/shm, cores per rank); ViT-B/32 with random weights at 224 px
# (image-tower posts/s in bf16; the embedding cache end to end with 8 and 16 loader workers next to the GPU
# utilisation); each module's training steps/s at batch 128 and 1024; train.py on one GPU and with DDP on every GPU
# (torchrun), and the shard-training path, with the wall time of every stage (rank-0-only ones included); the shard
# path's learning rate and steps per epoch; bf16 vs fp32 on one checkpoint; CatBoost on the GPU vs the CPU; peak
# memory per GPU. One table at the end (also DIR/gpu_check.json, default outputs/gpu_check).
# Without CUDA it stops at once ("no CUDA"); --cpu is a quick dry run of every code path on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PY:-python3}; fi
"$PY" -c "import torch" 2>/dev/null || { echo "gpu_check: $PY cannot import torch (run make install, or set PY)" >&2; exit 1; }
export WANDB_MODE=offline PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
