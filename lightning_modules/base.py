"""What every popstack LightningModule shares: batch encoding (raw -> cached form), regression metrics,
and the AdamW optimiser with an optional cosine schedule."""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from torchmetrics import MeanAbsoluteError, SpearmanCorrCoef

from popstack.lightning_modules.backbone import encode_posts, load_backbone


class PostModule(L.LightningModule):
    """Base class. Subclasses call ``_init_backbone`` when they need CLIP and implement ``forward``/``losses``.

    Args common to all subclasses: ``lr``, ``weight_decay``, ``scheduler`` ("cosine" | "constant"),
    ``token_len`` (per-token text features kept when encoding raw batches).

    Class attributes read by the pipeline before a module is built:
    ``needs_images``: why the module is pointless on a dataset without a readable image (its input is essentially
    the image), or "" when it still learns from the text side; such a module is not trained then
    (``pipeline.neural.enabled_modules``).
    ``min_classes``: the fewest subcategories its classification needs (0: it classifies nothing); a run whose posts
    have fewer does not train it (``pipeline.neural.enabled_modules``), e.g. a table of one kind of post.
    ``image_f_blocks``: the F blocks it emits (``predict_step``) that are functions of the image alone, constant
    without images and then left out of the F vector.
    ``encode_images`` (instance attribute, not a hyper-parameter): False when the run has no readable image; raw
    batches are then encoded without the image tower (``encode_posts(images=False)``), as the cache was.
    """

    needs_images: str = ""
    min_classes: int = 0
    image_f_blocks: tuple[str, ...] = ()
    encode_images: bool = True

    def _init_backbone(self, model_name: str, pretrained: str | None, trainable_last_blocks: int) -> None:
        from popstack.lightning_modules.backbone import freeze

        bb = load_backbone(model_name, pretrained)
        freeze(bb.model, trainable_last_blocks)
        self.clip = bb.model
        self.tokenizer = bb.tokenizer
        self.frozen = trainable_last_blocks == 0

    def _init_regression_metrics(self) -> None:
        with warnings.catch_warnings():  # it keeps the fold's predictions (a float each): expected, not a leak
            warnings.filterwarnings("ignore", message="Metric `SpearmanCorrcoef` will save all targets")
            self.val_src = SpearmanCorrCoef()
        self.val_mae = MeanAbsoluteError()

    def encode(self, batch: dict) -> dict:
        """Return the batch in cached form: raw batches (``image``, ``text_ids``) go through the CLIP backbone."""
        if "image_emb" in batch:
            return batch
        if not hasattr(self, "clip"):
            raise ValueError(f"{type(self).__name__} was built without a backbone and cannot take raw image batches")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.frozen:
                self.clip.eval()
            enc = encode_posts(self.clip, batch["image"], batch["text_ids"], self.hparams.token_len,
                               image_grid=int(self.hparams.get("image_token_grid", 0)), images=self.encode_images)
        return {**batch, **enc}

    def on_train_epoch_start(self) -> None:
        """Training over shards: tell the datamodule the epoch, so each epoch reads the shards in its own order
        (``PopularityDataModule.set_epoch``; the cached path's sampler gets its epoch from Lightning)."""
        set_epoch = getattr(self.trainer.datamodule, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.current_epoch)

    def log_regression(self, pred: torch.Tensor, label: torch.Tensor, stage: str) -> None:
        keep = torch.isfinite(label)
        if stage == "val" and bool(keep.any()):
            self.val_src.update(pred[keep].float(), label[keep].float())
            self.val_mae.update(pred[keep].float(), label[keep].float())
            self.log("val/src", self.val_src, on_epoch=True, on_step=False, prog_bar=True)
            self.log("val/mae", self.val_mae, on_epoch=True, on_step=False, prog_bar=True)

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups (trainable parameters only); subclasses may give some a learning rate of their own."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        groups = [g for g in self.param_groups() if g["params"]]
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "constant":
            return opt
        if self.hparams.scheduler != "cosine":
            raise ValueError(f"scheduler must be cosine or constant, got {self.hparams.scheduler!r}")
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps < 1:
            raise ValueError(f"the cosine schedule needs the number of training steps, and the training loader gives "
                             f"none ({steps}); give it a length (shard loaders: datamodules.shards.make_loader)")
        total = int(steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
