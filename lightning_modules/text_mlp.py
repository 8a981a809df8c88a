"""A text MLP for text-heavy data: popularity from a post's text alone, trained per fold like the other regressors.

Input: the cached CLIP text embedding (layer-normalised) and, with ``use_tabular``, the standardised tabular vector,
which holds the sentence-encoder family (MiniLM embeddings of title + tags, ``features.sentence_model``) among the
other feature families. An MLP (FC -> ReLU -> Dropout per hidden width) regresses the standardised label with the
Huber loss; fold models keep the checkpoint with the best validation MAE. It never reads the image, so it is
trained on a dataset without a readable image too. Off by default: ``model.text_mlp.enabled=true``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from popstack.datamodules.typed import setting
from popstack.lightning_modules.registry import (
    BuildContext,
    ModuleConfig,
    ModuleSpec,
    hyperparameters,
    register_module,
)
from popstack.lightning_modules.regressors import RegressorModule, mlp


@dataclass
class TextMLPConfig(ModuleConfig):
    """``model.text_mlp``: enabled (off by default: an opt-in member for text-heavy data), use_tabular (also read
    the standardised tabular vector: the sentence embeddings and every other feature family), hidden (MLP
    widths), dropout."""

    enabled: bool = setting(False)
    use_tabular: bool = setting(True)
    hidden: list[int] = setting([256, 64])
    dropout: float = setting(0.1, lo=0, hi=1)


class TextMLPModule(RegressorModule):
    """MLP on [LayerNorm(CLIP text embedding); tabular vector] -> popularity (Huber loss).

    Args: embed_dim (CLIP dim D), tabular_dim (0 = text embedding only), hidden, dropout, huber_delta, lr,
    weight_decay, scheduler, token_len, target_mean/target_std (the head predicts (y - mean) / std), and
    optionally backbone_name / backbone_pretrained (+ trainable_last_blocks) to accept raw batches.
    """

    cache_fields = ("text_emb",)  # the one embedding-cache array it reads

    def __init__(self, *, embed_dim: int, tabular_dim: int, hidden: tuple[int, ...], dropout: float,
                 huber_delta: float, lr: float, weight_decay: float, scheduler: str, token_len: int,
                 target_mean: float = 0.0, target_std: float = 1.0, backbone_name: str | None = None,
                 backbone_pretrained: str | None = None, trainable_last_blocks: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self._init_inputs(backbone_name, backbone_pretrained, trainable_last_blocks)
        self.text_norm = nn.LayerNorm(embed_dim)
        self.head = mlp([embed_dim + tabular_dim, *hidden], dropout, batch_norm=False)

    @classmethod
    def build(cls, config: TextMLPConfig, ctx: BuildContext) -> "TextMLPModule":
        return cls(embed_dim=ctx.embed_dim, tabular_dim=ctx.tabular_dim, token_len=ctx.token_len,
                   target_mean=ctx.target_mean, target_std=ctx.target_std, **ctx.raw_batch_args(),
                   **hyperparameters(config, leave_out=("use_tabular",)))

    def encode(self, batch: dict) -> dict:
        """Cached batches carry ``text_emb`` only (no image array); raw batches go through CLIP."""
        return batch if "text_emb" in batch else super().encode(batch)

    def features(self, b: dict) -> torch.Tensor:
        parts = [self.text_norm(b["text_emb"].float())]
        if self.hparams.tabular_dim:
            if "tabular" not in b:
                raise KeyError("TextMLPModule was built with tabular_dim > 0 but the batch has no 'tabular'")
            parts.append(b["tabular"].float())
        return torch.cat(parts, dim=-1)


register_module(ModuleSpec(
    name="text_mlp", module=TextMLPModule, config=TextMLPConfig, build=TextMLPModule.build, monitor="val/mae",
    mode="min", cache_fields=TextMLPModule.cache_fields, reads_tabular=lambda config: config.use_tabular,
))
