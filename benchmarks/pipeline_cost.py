"""Cost model of a full run: each stage's measured rate at two sizes, projected to SMPD (486k posts).

    python benchmarks/pipeline_cost.py [--sizes 600,1200] [--overrides "experiment=smpd backbone=tiny ..."]
    python benchmarks/pipeline_cost.py --runs RUN_A,RUN_B       # finished run directories instead of new runs

Each stage's wall seconds come from the run's ``manifests/<stage>.json``. Per stage, seconds(n) = fixed + per_post * n
is fitted through the two sizes (n = posts) and evaluated at ``--target`` posts: the "this machine" column. The GPU
columns: with a CUDA device present, rerun this script there (its rows are then measured). Without one they are
computed from the formula below and marked "formula":

- CPU stages (prepare, features, stack, report) scale with cores: this machine's projection * cores_here / --cores
  (tree fits and the process-pool prepare are parallel over cores; an upper bound on their speed-up).
- GPU stages (neural = embedding cache + training, extract): max(decode floor, FLOP floor) per GPU for the
  ``--gpu-backbone`` CLIP (default ViT-B-32, what ``experiment=smpd`` runs; the CPU runs use the tiny one), where
  decode floor = target images / (--decode-rate per core * --cores) (PIL + draft measured about 500 images/s per core,
  DESIGN.md), FLOP floor = target * (cache FLOPs per post + epochs * train FLOPs per post) / (--gpu-tflops * --mfu);
  the cache and training split over GPUs (DDP), decode over the machine's cores.

The dominant stage is named with its floor (decode, FLOP or tree-fit bound).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import ROOT, print_table, write_results

STAGES = ("prepare", "features", "neural", "extract", "stack", "report")
CPU_STAGES = ("prepare", "features", "stack", "report")
#: Forward GFLOPs per post of the frozen CLIP (one 224 px image + one 77-token text), by backbone name.
CLIP_GFLOPS = {"ViT-B-32-quickgelu": 4.4 + 2.9, "ViT-B-32": 4.4 + 2.9, "ViT-L-14": 81.1 + 6.0,
               "popstack-tiny-clip": 0.05}
#: GFLOPs per post and epoch of the prompt module on cached embeddings (forward + backward), ViT-B/32 text tower:
#: 2 x 77 cut prompts x ~22 tokens x 2 x 38M parameters x 3 (fwd + bwd) per step of 128 posts = 6 GFLOPs per post.
#: The co-attention and hierarchical regressors are MLPs on cached vectors (< 0.01 GFLOPs per post): left out.
TRAIN_GFLOPS_PER_POST = 6.0


def run_pipeline(posts: int, overrides: list[str], out: Path) -> Path:
    """Run train.py on a synthetic dataset of ``posts`` posts (65% labelled) into ``out``; returns the run dir."""
    n_train = int(round(posts * 0.65))
    run_dir = out / f"run-{posts}"
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"data.synthetic.n_train={n_train}",
           f"data.synthetic.n_test={posts - n_train}", f"data.root={out}/data-{posts}", f"run_dir={run_dir}",
           "progress_bar=false"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"})
    return run_dir


def stage_seconds(run_dir: Path) -> tuple[int, dict[str, float], dict]:
    """(posts, {stage: seconds}, resolved config) of a finished run directory."""
    import yaml

    prep = json.loads((run_dir / "manifests" / "prepare.json").read_text())
    seconds = {}
    for s in STAGES:
        path = run_dir / "manifests" / f"{s}.json"
        if path.is_file():
            seconds[s] = float(json.loads(path.read_text())["seconds"])
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int(prep["counts"]["posts"]), seconds, cfg


def linear(n1: int, t1: float, n2: int, t2: float) -> tuple[float, float]:
    """(fixed seconds, seconds per post) through two points; the fixed part is kept >= 0. A stage that did not grow
    between the two sizes (its fixed cost hides the per-post part) is taken as all per-post, t2 / n2: an upper
    bound rather than the flat line the two points would give."""
    per = (t2 - t1) / (n2 - n1) if n2 != n1 else 0.0
    if per <= 0.0:
        return 0.0, t2 / n2
    fixed = max(t2 - per * n2, 0.0)
    if fixed == 0.0:
        per = t2 / n2
    return fixed, per


def gpu_formula(stage: str, target: int, cfg: dict, gpus: int, a) -> tuple[float, str]:
    """Projected seconds of a GPU stage on ``gpus`` GPUs with ``a.cores`` cores, and its bound."""
    gflops = CLIP_GFLOPS[a.gpu_backbone]
    folds = int(cfg["n_folds"])
    pp = cfg["model"]["prompt_prototype"]
    epochs = int(pp["epochs"]) * (folds - 1) if pp["enabled"] else 0  # post-epochs per post over the K fold fits
    flops_s = a.gpu_tflops * 1e12 * a.mfu * gpus
    if stage == "neural":
        decode = target / (a.decode_rate * a.cores)
        flop = target * (gflops + epochs * TRAIN_GFLOPS_PER_POST) * 1e9 / flops_s
        return (decode, "decode") if decode >= flop else (flop, "FLOP")
    # extract: every fold's model predicts every post from the cache (forward only: a third of forward + backward)
    return target * folds * (TRAIN_GFLOPS_PER_POST / 3 if pp["enabled"] else 0.01) * 1e9 / flops_s, "FLOP"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="600,1200", help="two post counts (65%% labelled)")
    p.add_argument("--runs", default="", help="two finished run directories instead of --sizes")
    p.add_argument("--overrides", default="experiment=smpd data=synthetic backbone=tiny trainer=cpu logger=none",
                   help="train.py overrides of the measured runs (the 486k run is projected for these settings)")
    p.add_argument("--out", default="/tmp/popstack-pipeline-cost")
    p.add_argument("--target", type=int, default=486_194, help="posts to project to (SMPD: 305,613 + 180,581)")
    p.add_argument("--cores", type=int, default=16, help="CPU cores of the GPU machine")
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="dense bf16 TFLOP/s of one GPU (H100 SXM: ~990)")
    p.add_argument("--mfu", type=float, default=0.3, help="share of peak a training/inference step reaches")
    p.add_argument("--decode-rate", type=float, default=500.0, help="JPEG decode + resize, images/s per core")
    p.add_argument("--gpu-backbone", default="ViT-B-32", choices=sorted(CLIP_GFLOPS),
                   help="CLIP of the projected GPU run (the CPU runs use the tiny one; experiment=smpd uses ViT-B-32)")
    a = p.parse_args()
    if a.runs:
        dirs = [Path(d) for d in a.runs.split(",")]
    else:
        dirs = [run_pipeline(int(s), a.overrides.split(), Path(a.out)) for s in a.sizes.split(",")]
    if len(dirs) != 2:
        raise SystemExit("give two sizes or two run directories")
    (n1, s1, _), (n2, s2, cfg) = sorted((stage_seconds(d) for d in dirs), key=lambda r: r[0])
    cores_here = len(os.sched_getaffinity(0))
    import torch

    gpu_here = torch.cuda.is_available()
    rows, totals = [], {"here": 0.0, "gpu1": 0.0, "gpu8": 0.0}
    for stage in STAGES:
        if stage not in s1 or stage not in s2:
            continue
        fixed, per = linear(n1, s1[stage], n2, s2[stage])
        here = fixed + per * a.target
        if stage in CPU_STAGES or gpu_here:
            g1 = g8 = here * cores_here / a.cores if stage in CPU_STAGES and not gpu_here else here
            bound = "tree-fit" if stage == "stack" else ("CPU" if stage in CPU_STAGES else "measured")
            how = "measured" if gpu_here else "formula"
        else:
            (g1, bound), (g8, _) = gpu_formula(stage, a.target, cfg, 1, a), gpu_formula(stage, a.target, cfg, 8, a)
            how = "formula"
        totals["here"] += here
        totals["gpu1"] += g1
        totals["gpu8"] += g8
        rows.append({"stage": stage, f"s@{n1}": round(s1[stage], 1), f"s@{n2}": round(s2[stage], 1),
                     "ms/post": round(1e3 * per, 3), f"{a.target // 1000}k here (s)": round(here),
                     "1 GPU (s)": round(g1), "8 GPUs (s)": round(g8), "bound": bound, "GPU rows": how})
    rows.append({"stage": "total", f"{a.target // 1000}k here (s)": round(totals["here"]),
                 "1 GPU (s)": round(totals["gpu1"]), "8 GPUs (s)": round(totals["gpu8"])})
    gpu_how = "measured GPU" if gpu_here else f"formula GPU: {a.gpu_backbone}, {a.gpu_tflops} TFLOP/s x MFU {a.mfu}"
    title = (f"projected seconds per stage for {a.target} posts ({cores_here} cores here; "
             f"GPU machine: {a.cores} cores, {gpu_how})")
    print_table(rows, title)
    dominant = max(rows[:-1], key=lambda r: r["1 GPU (s)"])
    print(f"\ndominant stage on 1 GPU: {dominant['stage']} ({dominant['1 GPU (s)']} s, {dominant['bound']} bound); "
          f"total {totals['gpu1'] / 3600:.2f} h on 1 GPU, {totals['gpu8'] / 3600:.2f} h on 8, "
          f"{totals['here'] / 3600:.1f} h on this machine")
    write_results("pipeline_cost", {"runs": [str(d) for d in dirs], "sizes": [n1, n2], "args": vars(a), "rows": rows,
                                    "gpu_measured": gpu_here})


if __name__ == "__main__":
    main()
