"""Training steps/s and samples/s of each Lightning module: fp32 vs bf16-mixed, frozen-feature cache on vs off.

    python benchmarks/training_throughput.py [--model popstack-tiny-clip] [--batch-size 128] [--steps 20]
        [--accelerator cpu] [--classes 77]

"cache on" feeds cached CLIP features (the default path: the frozen towers ran once); "cache off" feeds raw
images + token ids, so every step also runs the frozen CLIP towers. Target on GPU: bf16 >= 2x fp32.
"""

from __future__ import annotations

import argparse
import time

from common import print_table, write_results


def batches(kind: str, n_steps: int, bs: int, dim: int, image_size: int, k: int, tokenizer, token_len: int,
            grid: int):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_steps):
        b = {"post_id": [str(i) for i in range(bs)], "has_image": torch.ones(bs, dtype=torch.bool),
             "subcategory_id": torch.randint(0, k, (bs,), generator=g), "category_id": torch.zeros(bs).long(),
             "label": torch.rand(bs, generator=g) * 10, "tabular": torch.randn(bs, 64, generator=g)}
        if kind == "cache on":
            b.update(image_emb=torch.randn(bs, dim, generator=g), text_emb=torch.randn(bs, dim, generator=g),
                     text_tokens=torch.randn(bs, token_len, dim, generator=g),
                     text_mask=torch.ones(bs, token_len, dtype=torch.bool),
                     image_tokens=torch.randn(bs, grid * grid, dim, generator=g))  # the cached patch tokens
        else:
            b.update(image=torch.randn(bs, 3, image_size, image_size, generator=g),
                     text_ids=tokenizer([f"a photo number {i} of a tag" for i in range(bs)]))
        out.append(b)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="popstack-tiny-clip")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--classes", type=int, default=77)
    p.add_argument("--token-len", type=int, default=32)
    p.add_argument("--image-token-grid", type=int, default=7)
    a = p.parse_args()
    import inspect

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from popstack.lightning_modules.backbone import load_backbone
    from popstack.lightning_modules.prompt_prototype_module import PromptPrototypeModule
    from popstack.lightning_modules.registry import module_spec
    from popstack.lightning_modules.regressors import CLIPHierarchicalPredictor, CoAttentionMLPModule

    def config_args(name: str) -> dict:
        """The module's constructor arguments from its default config (``model.<name>``'s dataclass)."""
        spec = module_spec(name)
        config, params = spec.config_of(), inspect.signature(spec.module.__init__).parameters
        return {k: getattr(config, k) for k in vars(config) if k in params}

    bb = load_backbone(a.model)
    dim, k = bb.embed_dim, a.classes
    rows = []
    for name in ("prompt_prototype", "co_attention", "hierarchical"):
        for kind in ("cache on", "cache off"):
            for precision in ("32-true", "bf16-mixed"):
                torch.manual_seed(0)
                raw_kw = {} if kind == "cache on" else {"backbone_name": a.model}
                hp = config_args(name)
                if name == "prompt_prototype":
                    m = PromptPrototypeModule([f"class {i}" for i in range(k)], backbone_name=a.model,
                                              backbone_pretrained=None, trainable_last_blocks=0,
                                              token_len=a.token_len, **hp)
                    m.set_prototypes(torch.randn(k, dim), torch.randn(k, dim))
                elif name == "co_attention":
                    m = CoAttentionMLPModule(embed_dim=dim, tabular_dim=64, token_len=a.token_len,
                                             image_token_grid=a.image_token_grid, **hp, **raw_kw)
                else:
                    m = CLIPHierarchicalPredictor(embed_dim=dim, token_len=a.token_len, **hp, **raw_kw)
                data = batches(kind, a.steps + 3, a.batch_size, dim, bb.image_size, k, bb.tokenizer, a.token_len,
                               a.image_token_grid)

                class Timer(L.Callback):
                    def on_train_batch_start(self, trainer, *args):
                        if trainer.global_step == 3:
                            if a.accelerator != "cpu":
                                torch.cuda.synchronize()
                            self.start = time.perf_counter()

                timer = Timer()
                trainer = L.Trainer(max_steps=a.steps + 3, accelerator=a.accelerator, devices=1, precision=precision,
                                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, callbacks=[timer])
                trainer.fit(m, train_dataloaders=DataLoader(data, batch_size=None))
                if a.accelerator != "cpu":
                    torch.cuda.synchronize()
                sec = time.perf_counter() - timer.start
                rows.append({"module": name, "input": kind, "precision": precision,
                             "steps_per_s": round(a.steps / sec, 2),
                             "samples_per_s": round(a.steps * a.batch_size / sec, 1)})
    print_table(rows, f"training throughput, {a.model}, batch {a.batch_size}, {a.accelerator}")
    write_results(f"training_{a.model}_{a.accelerator}", {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
