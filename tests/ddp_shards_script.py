"""Launched by tests/test_ddp.py with torchrun (2 CPU processes, gloo): one epoch of the prompt/prototype module
over WebDataset shards through PopularityDataModule, with the last CLIP block of each tower trainable. Each rank
writes how many batches it trained and validated on, the validation metrics it got, and, per CLIP parameter,
whether it changed and a checksum of its values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from popstack.datamodules.popularity import PopularityDataModule
from popstack.lightning_modules.backbone import TINY_MODEL
from popstack.lightning_modules.prompt_prototype_module import PromptPrototypeModule


class CountBatches(L.Callback):
    def __init__(self, out: Path):
        self.out, self.n, self.val = out, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.n += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val += not trainer.sanity_checking

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"batches": self.n, "val_batches": self.val, "val_metrics": metrics}))


def main(work: Path) -> None:
    classes = json.loads((work / "vocab.json").read_text())["subcategory"]
    torch.manual_seed(0)
    module = PromptPrototypeModule(
        classes, backbone_name=TINY_MODEL, backbone_pretrained=None, trainable_last_blocks=1, n_ctx=2,
        ctx_init_std=0.02, tau=0.25, tau_s=0.02, learn_tau=False, proj_dim=16, heads=2, tau_v=0.07, tau_t=0.07,
        regression_weight=1.0, huber_delta=1.0, regression_hidden=8, lr=1e-4, weight_decay=1e-5, scheduler="cosine",
        prompt_lr=None, token_len=16)
    module.set_prototypes(torch.randn(len(classes), 64), torch.randn(len(classes), 64))
    before = {k: v.clone() for k, v in module.clip.state_dict().items()}
    dm = PopularityDataModule(str(work / "shards"), str(work / "folds.parquet"), batch_size=8, num_workers=1,
                              image_size=64, model_name=TINY_MODEL, fold=0, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CountBatches(work)])
    trainer.fit(module, dm)
    params = {name: {"changed": not torch.equal(before[name], p.detach()), "sum": float(p.detach().double().sum()),
                     "trainable": p.requires_grad}
              for name, p in module.clip.named_parameters()}
    (work / f"params{trainer.global_rank}.json").write_text(json.dumps(params))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
