"""Where one training step of the prompt/prototype module goes: the prompt learner (2K prompts through the frozen
text tower) against the cross-modal prototype classifier, forward + backward, and the whole step with AdamW.

    python benchmarks/prompt_prototype_step.py [--classes 77 | --vocab RUN_DIR/vocab.json] [--batch-size 128]
        [--steps 5] [--threads 1] [--model popstack-tiny-clip]

``--vocab`` takes a run's subcategory names (their token lengths set the prompts' length); ``--classes K`` makes K
short names. The module is built from its config dataclass (``model.prompt_prototype``'s defaults, the popularity
head off as in a run) on cached-feature batches of random numbers.
"""

from __future__ import annotations

import argparse
import json
import time

from common import print_table, write_results


def seconds_per_call(fn, repeats: int) -> float:
    for _ in range(2):  # warm-up
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=77)
    p.add_argument("--vocab", default=None, help="a run's vocab.json: its subcategory names replace --classes")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--token-len", type=int, default=32)
    p.add_argument("--model", default="popstack-tiny-clip")
    a = p.parse_args()

    import torch

    from popstack.lightning_modules.backbone import load_backbone
    from popstack.lightning_modules.prompt_prototype_module import PromptPrototypeModule
    from popstack.lightning_modules.registry import hyperparameters, module_spec

    torch.set_num_threads(a.threads)
    names = (json.load(open(a.vocab))["subcategory"] if a.vocab else [f"class {i}" for i in range(a.classes)])
    k, bs, tl = len(names), a.batch_size, a.token_len
    dim = load_backbone(a.model).embed_dim
    torch.manual_seed(0)
    m = PromptPrototypeModule(list(names), backbone_name=a.model, backbone_pretrained=None, trainable_last_blocks=0,
                              token_len=tl, target_mean=0.0, target_std=1.0,
                              **hyperparameters(module_spec("prompt_prototype").config_of(),
                                                leave_out=("shots", "n_time_bins")))
    m.set_prototypes(torch.randn(k, dim), torch.randn(k, dim))
    g = torch.Generator().manual_seed(0)
    batch = {"post_id": [str(i) for i in range(bs)], "has_image": torch.ones(bs, dtype=torch.bool),
             "subcategory_id": torch.randint(0, k, (bs,), generator=g), "category_id": torch.zeros(bs).long(),
             "label": torch.rand(bs, generator=g), "image_emb": torch.randn(bs, dim, generator=g),
             "text_emb": torch.randn(bs, dim, generator=g), "text_tokens": torch.randn(bs, tl, dim, generator=g),
             "text_mask": torch.ones(bs, tl, dtype=torch.bool)}
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
    m.train()

    def prompts():
        g_emb, l_emb = m.prompts()
        (g_emb.sum() + l_emb.sum()).backward()

    def classifier():
        m.classifier(batch["image_emb"], m.visual_prototypes, m.textual_prototypes)["logits"].sum().backward()

    def step():
        loss = m.losses(m(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows = [{"part": part, "classes": k, "prompt_positions": m.prompts.n_positions,
             "seconds": round(seconds_per_call(fn, a.steps), 4)}
            for part, fn in (("prompt learner, fwd+bwd", prompts), ("prototype classifier, fwd+bwd", classifier),
                             ("training step (loss, backward, AdamW)", step))]
    print_table(rows, f"prompt/prototype step, {a.model}, batch {bs}, {a.threads} thread(s)")
    write_results(f"prompt_prototype_step_{k}", {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
