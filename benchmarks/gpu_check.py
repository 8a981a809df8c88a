"""The first-GPU-run check: what runs on this machine and how fast, in one table (see ``gpu_check.sh``).

    python benchmarks/gpu_check.py [--out outputs/gpu_check] [--cpu]

Sections (each is timed and may fail on its own: a failure is a row of the table, the others still run):
  env        torch, CUDA, driver, GPU names, /dev/shm, cores per rank (``data.num_workers: auto``)
  model      ViT-B/32, random weights, 224 px: image-tower posts/s in bf16 autocast (model only, no decode)
  cache      the embedding cache end to end over pre-sized shards (decode in W loader workers, uint8 batches,
             normalised on the GPU) with 8 and 16 workers, next to the GPU utilisation nvidia-smi saw meanwhile
  train      each module's training steps/s at batch 128 and 1024 on one GPU (training_throughput.py, bf16)
  runs       train.py (tiny CLIP, synthetic posts): trainer=gpu, trainer=ddp on every GPU under torchrun, and the
             shard path (backbone.trainable_last_blocks=1): wall time of every stage (rank-0-only ones included)
  shard_lr   the shard path's learning rate at its first and last step and its steps per epoch (from the run's
             CSV log): a rate of 0 after step 1 is issue 23's schedule bug
  bf16       one checkpoint of the gpu run predicting every post in fp32 and in bf16-mixed: distinct values, max
             difference, Spearman
  stack      CatBoost on the GPU vs the CPU on the same matrix: seconds per fit, fallbacks, peak GPU memory
  memory     peak memory per GPU over the whole check (nvidia-smi every 200 ms)

``--cpu`` runs the same code paths on the CPU with the tiny CLIP and small sizes (a dry run of the script itself;
its numbers mean nothing for a GPU). Without ``--cpu`` and without CUDA it stops at once: "no CUDA".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, print_table

ROWS: list[dict] = []


def row(section: str, what: str, value, note: str = "") -> None:
    ROWS.append({"section": section, "what": what, "value": value, "note": note})
    print(f"[gpu_check] {section:8s} {what}: {value} {note}", flush=True)


def section(name: str):
    """Decorator: run a section, record its wall time, turn an exception into a 'failed' row."""
    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Exception as err:  # one failing section must not hide the others
                row(name, "FAILED", type(err).__name__, " ".join(str(err).split())[:160])
            row(name, "section wall time (s)", round(time.perf_counter() - start, 1))
        return run
    return wrap


class GpuSampler:
    """nvidia-smi every 200 ms in the background: utilisation and memory per GPU."""

    def __init__(self, path: Path):
        self.path, self.proc = path, None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.fh = open(self.path, "w")
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "200"], stdout=self.fh)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.fh.close()

    def samples(self) -> list[tuple[int, float, float]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and all(p.replace(".", "").isdigit() for p in parts):
                out.append((int(parts[0]), float(parts[1]), float(parts[2])))
        return out


@section("env")
def env(a) -> None:
    import torch

    from popstack.datamodules.cores import available_cores, cores_per_rank

    row("env", "python / torch", f"{sys.version.split()[0]} / {torch.__version__}")
    row("env", "CUDA (torch) / available", f"{torch.version.cuda} / {torch.cuda.is_available()}")
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True).stdout.strip().splitlines()
        row("env", "GPUs", len(q), "; ".join(sorted(set(q))))
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").exists() else None
    row("env", "/dev/shm (GiB)", round(shm.total / 2**30, 1) if shm else "absent",
        "loader workers pass batches through it: >= 8 GiB wanted")
    ngpu = max(1, torch.cuda.device_count())
    row("env", "cores / cores per rank", f"{available_cores()} / {cores_per_rank(ngpu)}",
        f"{ngpu} rank(s) per node; data.num_workers=auto -> {cores_per_rank(ngpu) - 1}")


def clip_model(a):
    from popstack.lightning_modules.backbone import load_backbone, register_local_configs

    register_local_configs()
    return load_backbone(a.model, None)


@section("model")
def model_only(a) -> None:
    import torch

    bb = clip_model(a)
    model = bb.model.to(a.device).eval()
    x = torch.randint(0, 256, (a.batch, 3, bb.image_size, bb.image_size), dtype=torch.uint8, device=a.device)
    from popstack.datamodules.shards import normalise_images

    amp = torch.autocast(a.device, dtype=torch.bfloat16)
    with torch.inference_mode(), amp:
        for _ in range(2):
            model.encode_image(normalise_images(x))
        sync(a)
        start = time.perf_counter()
        for _ in range(a.iters):
            model.encode_image(normalise_images(x))
        sync(a)
    rate = a.batch * a.iters / (time.perf_counter() - start)
    row("model", f"{a.model} {bb.image_size}px image tower, bf16, batch {a.batch}", f"{rate:,.0f} posts/s")


def sync(a) -> None:
    import torch

    if a.device == "cuda":
        torch.cuda.synchronize()


@section("cache")
def cache(a, work: Path) -> None:
    import numpy as np
    import torch
    from data_throughput import make_data

    from popstack.datamodules.shards import Collate, SampleDecoder, make_eval_pipeline, make_loader, shard_urls
    from popstack.lightning_modules.embed import allocate_cache, encode_into

    bb = clip_model(a)
    data = work / "cache_data"
    if not data.exists():
        data.mkdir(parents=True)
        make_data(data, a.n_images, 640, 480, bb.image_size)
    posts = [str(i) for i in range(a.n_images)]
    index = {p: i for i, p in enumerate(posts)}
    for workers in a.workers:
        def allocate(enc, folder=work / f"cache{workers}"):
            return allocate_cache(folder, a.n_images, enc["image_emb"].shape[1], enc["text_tokens"].shape[1])

        loader = make_loader(make_eval_pipeline(shard_urls(data / "presized", ["train"]),
                                                decoder=SampleDecoder(bb.image_size, "title"),
                                                collate=Collate(bb.tokenizer), batch_size=a.batch, rank=0,
                                                world_size=1), workers)
        with GpuSampler(work / f"cache_{workers}.smi") as smi:
            start = time.perf_counter()
            written = encode_into(bb.model, loader, allocate, index, token_len=32,
                                  device=a.device, autocast_dtype=torch.bfloat16, progress=False)
            seconds = time.perf_counter() - start
        util = [u for _, u, _ in smi.samples()]
        row("cache", f"embedding cache end to end, {workers} workers", f"{len(written) / seconds:,.0f} posts/s",
            f"GPU utilisation mean {np.mean(util):.0f}%" if util else "no nvidia-smi")


@section("train")
def train_steps(a) -> None:
    for batch in a.train_batches:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "training_throughput.py"), "--model", a.model,
               "--batch-size", str(batch), "--steps", str(a.steps), "--accelerator", "gpu" if a.device == "cuda"
               else "cpu"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            row("train", f"batch {batch}", "FAILED", proc.stderr.strip().splitlines()[-1][:160] if proc.stderr
                else "")
            continue
        for line in proc.stdout.strip().splitlines():  # the module rows of training_throughput's table
            if line.split()[:1] and line.split()[0] in ("prompt_prototype", "co_attention", "hierarchical"):
                row("train", f"batch {batch}", " ".join(line.split()), "module input precision steps/s samples/s")


def train_run(a, work: Path, name: str, *overrides: str, torchrun: int = 0) -> Path:
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["debug=fast", "logger=none", f"paths.root_dir={work}", f"hydra.run.dir={run_dir}",
            f"data.synthetic.n_train={a.n_posts}", f"data.synthetic.n_test={a.n_posts // 4}", *overrides]
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}"] if torchrun
                else [sys.executable])
    start = time.perf_counter()
    proc = subprocess.run([*launcher, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "WANDB_MODE": "offline"})
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py {name} failed (exit {proc.returncode}), see {work / name}.log: "
                           f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    row("runs", f"{name}: train.py wall (s)", round(time.perf_counter() - start, 1), " ".join(overrides))
    for manifest in sorted((run_dir / "manifests").glob("*.json")):
        seconds = json.loads(manifest.read_text()).get("seconds")
        row("runs", f"{name}: stage {manifest.stem} (s)", seconds)
    return run_dir


@section("runs")
def runs(a, work: Path) -> None:
    import torch

    trainer = ["trainer=gpu"] if a.device == "cuda" else ["trainer=cpu"]
    train_run(a, work, "gpu", *trainer)
    n = torch.cuda.device_count()
    if n > 1:
        train_run(a, work, "ddp", "trainer=ddp", f"trainer.devices={n}", torchrun=n)
    else:
        row("runs", "ddp", "skipped", "one GPU: nothing to compare")
    train_run(a, work, "shards", *trainer, "backbone.trainable_last_blocks=1", "model.prompt_prototype.enabled=false",
              "model.co_attention.enabled=false", "model.hierarchical.epochs=2", "trainer.log_every_n_steps=1",
              "stages=[prepare,features,neural]")


@section("shard_lr")
def shard_lr(a, work: Path) -> None:
    import pandas as pd

    logs = sorted((work / "shards" / "neural").glob("*/fold0/csv/**/metrics.csv"))
    if not logs:
        raise FileNotFoundError(f"no CSV log under {work / 'shards' / 'neural'} (did the runs section pass?)")
    m = pd.read_csv(logs[0])
    lr_cols = [c for c in m.columns if "lr" in c.lower()]
    if not lr_cols:
        raise KeyError(f"{logs[0]}: no learning-rate column (columns: {list(m.columns)[:8]})")
    lr = m[["step", lr_cols[0]]].dropna()
    row("shard_lr", f"{lr_cols[0]} at first / last logged step",
        f"{lr.iloc[0, 1]:.3g} (step {int(lr.iloc[0, 0])}) / {lr.iloc[-1, 1]:.3g} (step {int(lr.iloc[-1, 0])})")
    if "epoch" in m.columns:
        steps = m.groupby("epoch")["step"].max().diff().dropna()
        row("shard_lr", "steps per epoch", steps.astype(int).tolist()[:5])


@section("bf16")
def bf16_vs_fp32(a, work: Path) -> None:
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from popstack.datamodules.cached import EmbeddingDataModule
    from popstack.pipeline.neural import load_module
    from popstack.pipeline.training import finished_checkpoint

    run = work / "gpu"
    fold = run / "neural" / "hierarchical" / "fold0"
    module = load_module("hierarchical", finished_checkpoint(fold)).to(a.device).eval()
    dm = EmbeddingDataModule(str(run / "embeddings"), str(run / "posts.parquet"), str(run / "folds.parquet"),
                             str(run / "vocab.json"), fold=None, batch_size=1024,
                             fields=getattr(type(module), "cache_fields", ("image_emb", "text_emb")))
    outs = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        preds = []
        with torch.inference_mode(), torch.autocast(a.device, dtype=amp or torch.float32, enabled=amp is not None):
            for batch in dm.predict_dataloader():
                batch = {k: v.to(a.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                out = module.predict_step(batch, 0)
                preds.append(out["prediction"].float().cpu().numpy())
        outs[name] = np.concatenate(preds)
    f, b = outs["fp32"], outs["bf16"]
    row("bf16", "distinct predictions fp32 / bf16 / posts", f"{len(np.unique(f))} / {len(np.unique(b))} / {len(f)}")
    row("bf16", "max |bf16 - fp32|", f"{np.abs(b - f).max():.4g}", f"Spearman {spearmanr(f, b)[0]:.5f}")


@section("stack")
def stack(a, work: Path) -> None:
    import numpy as np
    import pandas as pd

    import popstack.stacking.members as members
    from popstack.stacking.members.catboost import CATBOOST_DEVICE

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(a.stack_rows, 200)).astype(np.float32), columns=[f"f{i}" for i in range(200)])
    y = X.f0.to_numpy() + rng.normal(size=len(X))
    cut = int(len(X) * 0.8)
    params = {"iterations": a.stack_iters, "learning_rate": 0.1, "depth": 6, "loss_function": "Huber:delta=1.0",
              "eval_metric": "MAE", "thread_count": -1, "devices": "0", "gpu_ram_part": 0.5}
    for use_gpu in (True, False):
        CATBOOST_DEVICE.reset()
        with GpuSampler(work / f"stack_{use_gpu}.smi") as smi:
            start = time.perf_counter()
            m = members.make_member("catboost", {**params, "use_gpu": use_gpu}, [], seed=0)
            m.fit(X[:cut], y[:cut], X[cut:], y[cut:])
            seconds = time.perf_counter() - start
        mem = max((used for _, _, used in smi.samples()), default=0)
        decided = members.CATBOOST_DEVICE.decided or "CPU"
        row("stack", f"CatBoost {'GPU' if use_gpu else 'CPU'} fit {a.stack_rows}x200, {a.stack_iters} it (s)",
            round(seconds, 2), f"ran on {decided}; fallbacks {int(use_gpu and decided == 'CPU')}; "
                               f"peak GPU memory {mem:.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU: tiny CLIP, small sizes")
    p.add_argument("--sections", default="env,model,cache,train,runs,shard_lr,bf16,stack",
                   help="comma-separated subset")
    a = p.parse_args()
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA (torch.cuda.is_available() is False); use --cpu for a dry run of the script",
              file=sys.stderr)
        sys.exit(1)
    a.device = "cpu" if a.cpu else "cuda"
    if a.cpu:
        from popstack.lightning_modules.backbone import TINY_MODEL

        a.model, a.batch, a.iters, a.n_images, a.workers = TINY_MODEL, 16, 2, 64, [1]
        a.train_batches, a.steps, a.n_posts, a.stack_rows, a.stack_iters = [16], 3, 300, 2000, 20
    else:
        a.model, a.batch, a.iters, a.n_images, a.workers = "ViT-B-32", 512, 20, 8192, [8, 16]
        a.train_batches, a.steps, a.n_posts, a.stack_rows, a.stack_iters = [128, 1024], 30, 4000, 200_000, 300
    a.out.mkdir(parents=True, exist_ok=True)
    wanted = set(a.sections.split(","))
    with tempfile.TemporaryDirectory(dir=a.out) as tmp, GpuSampler(a.out / "all.smi") as smi:
        work = Path(tmp)
        steps = [("env", env, ()), ("model", model_only, ()), ("cache", cache, (work,)), ("train", train_steps, ()),
                 ("runs", runs, (work,)), ("shard_lr", shard_lr, (work,)), ("bf16", bf16_vs_fp32, (work,)),
                 ("stack", stack, (work,))]
        for name, fn, extra in steps:
            if name in wanted:
                fn(a, *extra)
        for log in work.glob("*.log"):
            shutil.copy(log, a.out / log.name)
    peaks: dict[int, float] = {}
    for gpu, _, used in smi.samples():
        peaks[gpu] = max(peaks.get(gpu, 0.0), used)
    row("memory", "peak memory per GPU (MiB)", peaks or "no nvidia-smi")
    print_table(ROWS, f"gpu_check ({'CPU dry run' if a.cpu else 'GPU'})")
    (a.out / "gpu_check.json").write_text(json.dumps(ROWS, indent=1, default=str))


if __name__ == "__main__":
    main()
