"""HyperFusion's neural ensemble members (§3.4): the co-attention MLP and the CLIP hierarchical predictor.

Both regress popularity with the Huber loss (eq. 7) from the cached CLIP features (the default, frozen-backbone
path; the co-attention MLP also reads the cached patch tokens); given ``backbone_name`` they also accept raw shard
batches (image + tokens), encoded by their own CLIP copy, whose last ``trainable_last_blocks`` residual blocks per
tower train with the head (0 = frozen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from popstack.datamodules.typed import setting
from popstack.lightning_modules.backbone import float32
from popstack.lightning_modules.base import PostModule
from popstack.lightning_modules.losses import huber_loss
from popstack.lightning_modules.registry import (
    BuildContext,
    ModuleConfig,
    ModuleSpec,
    hyperparameters,
    register_module,
)


class CoAttention(nn.Module):
    """Visual and textual tokens attend to each other (HyperFusion §3.4's co-attention layers).

    The image side is CLIP's last-layer patch tokens (``lightning_modules.backbone.encode_image_tokens``, cached as
    ``image_tokens``), the text side the per-token CLIP text features (padding masked: masked tokens get no weight
    and cannot change the output). Every image token attends over the text tokens and every text token over the
    image tokens; each side is then mean-pooled (text over its real tokens) and joined with the pooled image and
    text embeddings.

    Shapes: image (B, D), image_tokens (B, P, D), text_emb (B, D), tokens (B, L, D), mask (B, L) -> (B, 4 * d).
    """

    def __init__(self, embed_dim: int, dim: int = 128, heads: int = 4):
        super().__init__()
        self.image_query = nn.Linear(embed_dim, dim)
        self.text_query = nn.Linear(embed_dim, dim)
        self.image_tokens = nn.Linear(embed_dim, dim)
        self.text_tokens = nn.Linear(embed_dim, dim)
        self.v2t = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.t2v = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, image: torch.Tensor, image_tokens: torch.Tensor, text_emb: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool().clone()
        mask[mask.sum(1) == 0, 0] = True  # a post with no token keeps one position, so softmax stays defined
        text_seq = self.text_tokens(tokens.float())
        vis_seq = self.image_tokens(image_tokens.float())
        attended_text, _ = self.v2t(vis_seq, text_seq, text_seq, key_padding_mask=~mask, need_weights=False)
        attended_vis, _ = self.t2v(text_seq, vis_seq, vis_seq, need_weights=False)
        weights = mask.unsqueeze(-1).float()
        text_side = (attended_vis * weights).sum(1) / weights.sum(1)
        return torch.cat([self.image_query(image.float()), attended_text.mean(1),
                          self.text_query(text_emb.float()), text_side], dim=-1)


def mlp(sizes: list[int], dropout: float, batch_norm: bool) -> nn.Sequential:
    """FC -> ReLU (-> BatchNorm) -> Dropout for each consecutive pair of ``sizes``, then a final FC to 1."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
        if batch_norm:
            layers.append(nn.BatchNorm1d(b))
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(sizes[-1], 1))
    return nn.Sequential(*layers)


class RegressorModule(PostModule):
    """Shared training/validation/predict steps of the popularity regressors."""

    def _init_inputs(self, backbone_name: str | None, backbone_pretrained: str | None,
                     trainable_last_blocks: int) -> None:
        """Metrics, and CLIP only when raw batches must be accepted (the cached path needs none)."""
        if trainable_last_blocks and not backbone_name:
            raise ValueError("trainable_last_blocks > 0 needs backbone_name (the CLIP model to fine-tune)")
        if backbone_name:
            self._init_backbone(backbone_name, backbone_pretrained, trainable_last_blocks)
        self._init_regression_metrics()

    def features(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> torch.Tensor:
        """Batch (cached or raw) -> (B,) predicted popularity (the head predicts the standardised label).

        The head and the de-standardisation run in float32 outside autocast (``backbone.float32``): under bf16 the
        predictions would otherwise land on a grid of 0.03-0.06 log-views."""
        h = self.features(self.encode(batch))
        with float32(h):
            z = self.head(h.float()).squeeze(-1)
            return z * self.hparams.target_std + self.hparams.target_mean

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = huber_loss(self(batch), batch["label"], self.hparams.huber_delta)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self(batch)
        self.log("val/loss", huber_loss(pred, batch["label"], self.hparams.huber_delta), on_epoch=True,
                 sync_dist=True, batch_size=len(batch["label"]))
        self.log_regression(pred, batch["label"], "val")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {"post_id": list(batch["post_id"]), "prediction": self(batch).float()}


@dataclass
class CoAttentionConfig(ModuleConfig):
    """``model.co_attention``: HyperFusion's co-attention MLP (§3.4; huber_delta: eq. 7). use_tabular: fuse the
    standardised tabular vector; attn_dim, heads: the co-attention layers; hidden: MLP widths; dropout."""

    use_tabular: bool = setting(True)
    attn_dim: int = setting(128, lo=1)
    heads: int = setting(4, lo=1)
    hidden: list[int] = setting([256, 64])
    dropout: float = setting(0.1, lo=0, hi=1)


@dataclass
class HierarchicalConfig(ModuleConfig):
    """``model.hierarchical``: HyperFusion's CLIP hierarchical predictor (§3.4). hidden: the FC widths; dropout."""

    hidden: list[int] = setting([512, 128, 32])
    dropout: float = setting(0.1, lo=0, hi=1)


class CoAttentionMLPModule(RegressorModule):
    """Co-attention over CLIP image/text features, fused with the tabular vector, then an MLP (Huber loss).

    Args: embed_dim (CLIP dim D), tabular_dim (0 = no tabular input), attn_dim, heads, hidden (MLP widths),
    dropout, huber_delta, lr, weight_decay, scheduler, token_len, image_token_grid (the patch-token grid raw
    batches are encoded with, as the cache was), target_mean/target_std (training-label statistics: the head
    predicts (y - mean) / std), and optionally backbone_name / backbone_pretrained (+ trainable_last_blocks) to
    accept raw batches.
    """

    #: without images the co-attention has nothing to attend over: every post's patch tokens are the same blank
    needs_images = "it attends over image patch tokens"

    cache_fields = ("image_emb", "text_emb", "text_tokens", "text_mask", "image_tokens")

    def __init__(self, *, embed_dim: int, tabular_dim: int, attn_dim: int, heads: int, hidden: tuple[int, ...],
                 dropout: float, huber_delta: float, lr: float, weight_decay: float, scheduler: str,
                 token_len: int, image_token_grid: int, target_mean: float = 0.0, target_std: float = 1.0,
                 backbone_name: str | None = None, backbone_pretrained: str | None = None,
                 trainable_last_blocks: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self._init_inputs(backbone_name, backbone_pretrained, trainable_last_blocks)
        self.coattention = CoAttention(embed_dim, attn_dim, heads)
        self.tabular = nn.Sequential(nn.Linear(tabular_dim, attn_dim), nn.ReLU()) if tabular_dim else None
        fused = 4 * attn_dim + (attn_dim if tabular_dim else 0)
        self.head = mlp([fused, *hidden], dropout, batch_norm=False)

    @classmethod
    def build(cls, config: CoAttentionConfig, ctx: BuildContext) -> "CoAttentionMLPModule":
        return cls(embed_dim=ctx.embed_dim, tabular_dim=ctx.tabular_dim, image_token_grid=ctx.image_token_grid,
                   token_len=ctx.token_len, target_mean=ctx.target_mean, target_std=ctx.target_std,
                   **ctx.raw_batch_args(), **hyperparameters(config, leave_out=("use_tabular",)))

    def features(self, b: dict) -> torch.Tensor:
        if "image_tokens" not in b:
            raise KeyError("CoAttentionMLPModule attends over patch tokens: the batch has no 'image_tokens' (build the "
                           "embedding cache with backbone.image_token_grid > 0)")
        parts = [self.coattention(b["image_emb"], b["image_tokens"], b["text_emb"], b["text_tokens"], b["text_mask"])]
        if self.tabular is not None:
            if "tabular" not in b:
                raise KeyError("CoAttentionMLPModule was built with tabular_dim > 0 but the batch has no 'tabular'")
            parts.append(self.tabular(b["tabular"].float()))
        return torch.cat(parts, dim=-1)


class CLIPHierarchicalPredictor(RegressorModule):
    """Stacked FC + ReLU + BatchNorm layers on [CLIP image embedding; CLIP text embedding] (Huber loss)."""

    cache_fields = ("image_emb", "text_emb")  # the embedding-cache arrays it reads (not the per-token features)
    #: needs_images stays "": without images its image half is zeros and the text half still learns

    def __init__(self, *, embed_dim: int, hidden: tuple[int, ...], dropout: float, huber_delta: float, lr: float,
                 weight_decay: float, scheduler: str, token_len: int, target_mean: float = 0.0,
                 target_std: float = 1.0, backbone_name: str | None = None, backbone_pretrained: str | None = None,
                 trainable_last_blocks: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self._init_inputs(backbone_name, backbone_pretrained, trainable_last_blocks)
        self.head = mlp([2 * embed_dim, *hidden], dropout, batch_norm=True)

    @classmethod
    def build(cls, config: HierarchicalConfig, ctx: BuildContext) -> "CLIPHierarchicalPredictor":
        return cls(embed_dim=ctx.embed_dim, token_len=ctx.token_len, target_mean=ctx.target_mean,
                   target_std=ctx.target_std, **ctx.raw_batch_args(), **hyperparameters(config))

    def features(self, b: dict) -> torch.Tensor:
        return torch.cat([b["image_emb"].float(), b["text_emb"].float()], dim=-1)


register_module(ModuleSpec(
    name="co_attention", module=CoAttentionMLPModule, config=CoAttentionConfig, build=CoAttentionMLPModule.build,
    monitor="val/mae", mode="min", cache_fields=CoAttentionMLPModule.cache_fields,
    reads_tabular=lambda config: config.use_tabular, patch_tokens=True,
))
register_module(ModuleSpec(
    name="hierarchical", module=CLIPHierarchicalPredictor, config=HierarchicalConfig,
    build=CLIPHierarchicalPredictor.build, monitor="val/mae", mode="min",
    cache_fields=CLIPHierarchicalPredictor.cache_fields,
))
