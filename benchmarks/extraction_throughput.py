"""CLIP image-tower throughput: model only, decode only (the data pipeline's bound), and end to end (the
pipeline's embedding cache, ``pipeline.neural.build_cache``, over shards); end-to-end as a fraction of
min(model, decode). fp32 vs bf16 (``trainer.precision``; the cache autocasts to bf16 on CUDA only).

    python benchmarks/extraction_throughput.py [--model popstack-tiny-clip] [--n 1024] [--workers 2] [--device cpu]

On a GPU: --model ViT-B-32 --device cuda --workers 8 (random weights are fine for speed). --image-grid g also caches
the g x g patch tokens (the co-attention MLP's input; 0: the module is off and none are cached).
Target: end to end >= 80% of min(model, decode).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import print_table, write_results
from data_throughput import make_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="popstack-tiny-clip")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="640x480")
    p.add_argument("--image-grid", type=int, default=0)
    a = p.parse_args()
    import torch

    from popstack.datamodules.shards import Collate, SampleDecoder, make_eval_pipeline, make_loader, shard_urls
    from popstack.lightning_modules.backbone import load_backbone
    from popstack.pipeline.config import compose_config
    from popstack.pipeline.layout import RunLayout
    from popstack.pipeline.neural import build_cache

    bb = load_backbone(a.model)
    model = bb.model.to(a.device).eval()
    w, h = map(int, a.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        posts = make_data(work, a.n, w, h, bb.image_size)
        urls = shard_urls(work / "presized", ["train"])  # as prepare writes them with data.image_short_side
        decoder, collate = SampleDecoder(bb.image_size, "title"), Collate(bb.tokenizer)

        def loader():
            return make_loader(make_eval_pipeline(urls, decoder=decoder, collate=collate, batch_size=a.batch_size,
                                                  rank=0, world_size=1), a.workers)

        start = time.perf_counter()
        n = sum(len(b["post_id"]) for b in loader())
        decode_rate = n / (time.perf_counter() - start)
        for dtype in (None, torch.bfloat16):
            x = torch.randn(a.batch_size, 3, bb.image_size, bb.image_size, device=a.device)
            ctx = torch.autocast(device_type=torch.device(a.device).type, dtype=dtype) if dtype else torch.no_grad()
            with torch.inference_mode(), ctx:
                model.encode_image(x)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                reps = max(1, a.n // a.batch_size)
                for _ in range(reps):
                    model.encode_image(x)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                model_rate = reps * a.batch_size / (time.perf_counter() - start)
            run = RunLayout(work / f"run-{dtype}")  # a run directory holding what build_cache reads
            run.root.mkdir()
            posts[["post_id", "split"]].to_parquet(run.posts)
            run.shards.symlink_to(work / "presized")  # as prepare writes them with data.image_short_side
            cfg = compose_config([
                "~experiment", f"run_dir={run.root}", f"backbone.name={a.model}", "backbone.pretrained=null",
                f"backbone.embed_batch_size={a.batch_size}", "backbone.token_len=32", "data.text_field=title",
                f"data.num_workers={a.workers}", "progress_bar=false", "trainer.devices=1",
                f"trainer.accelerator={'cuda' if a.device.startswith('cuda') else 'cpu'}",
                f"trainer.precision={'bf16-mixed' if dtype else '32-true'}",
                *([f"backbone.image_token_grid={a.image_grid}"] if a.image_grid else
                  ["model.co_attention.enabled=false"])])
            start = time.perf_counter()
            build_cache(cfg, run)
            e2e = a.n / (time.perf_counter() - start)
            rows.append({"precision": "bf16-mixed" if dtype else "32-true", "model_img_per_s": round(model_rate, 1),
                         "decode_img_per_s": round(decode_rate, 1), "end_to_end_img_per_s": round(e2e, 1),
                         "e2e_fraction_of_bound": round(e2e / min(model_rate, decode_rate), 3)})
    print_table(rows, f"{a.model} on {a.device}, {a.n} JPEGs {a.size}, {a.workers} workers")
    write_results(f"extraction_{a.model}_{a.device}", {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
