"""Dual-grained prompt learning (CMPA-DGPL §3.2, after TaI-DPT): learnable global and local contexts.

Each class prompt is ``[SOS] [ctx_1 .. ctx_n] <class name> . [EOS] [pad ...]``: the SOS embedding (prefix) and the
class-name/EOS/padding embeddings (suffix) are frozen buffers, the n context vectors are learned (shared by all
classes, init N(0, ctx_init_std^2)). Passing the global prompts through the frozen text encoder gives the global
class embeddings G (K, D); the local prompts give L (K, D) (paper eqs. 1-2).

Speed: only the pooled (EOT) feature of each prompt is used, and CLIP's causal mask lets no position see a later
one, so the prompts are cut after the longest prompt's EOT token (about n_ctx + 5 of 77 positions) with identical
output. With frozen text weights, (G, L) are a function of the contexts alone: outside training (no autograd:
validation, predict) they are computed once per context version and reused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from popstack.lightning_modules.backbone import encode_text_embeddings, float32, text_tower

MASKED = -1e4  # added to padded positions before the softmax over tokens


def class_prompt_text(class_name: str, n_ctx: int) -> str:
    """The placeholder prompt whose X tokens are replaced by the learned context ("X X X dogs.")."""
    return " ".join(["X"] * n_ctx + [class_name.replace(",", " ").replace("&", " and ")]) + "."


def global_similarity(h: torch.Tensor, class_feats: torch.Tensor) -> torch.Tensor:
    """Paper eq. 4: cos(h, G_i). h (B, D), class_feats (K, D) -> (B, K), in float32 (also under autocast)."""
    with float32(h):
        return F.normalize(h.float(), dim=-1) @ F.normalize(class_feats.float(), dim=-1).T


def local_similarity(
    tokens: torch.Tensor, mask: torch.Tensor, class_feats: torch.Tensor, tau_s: float | torch.Tensor
) -> torch.Tensor:
    """Paper eq. 5 (TaI-DPT form): p'_i = sum_j softmax_j(P_ij / tau_s) * P_ij, P_ij = cos(H_j, L_i).

    Args:
        tokens: (B, L, D) per-token text features H.
        mask: (B, L) bool, True for real tokens; padded positions get no weight.
        class_feats: (K, D) local class embeddings L.
        tau_s: softmax temperature over tokens (smaller = focus on the best-matching token).

    Returns: (B, K) aggregated local similarities in [-1, 1], in float32 (also under autocast).
    """
    with float32(tokens):
        sim = torch.einsum("bld,kd->blk", F.normalize(tokens.float(), dim=-1),
                           F.normalize(class_feats.float(), dim=-1))
        scores = sim / tau_s + (~mask).unsqueeze(-1).float() * MASKED
        weights = scores.softmax(dim=1)
        return (weights * sim).sum(dim=1)


class DualGrainedPromptLearner(nn.Module):
    """Learnable global/local contexts -> global G (K, D) and local L (K, D) class embeddings.

    Args:
        clip_model: the (frozen) open_clip model; its text tower encodes the prompts.
        tokenizer: the open_clip tokenizer of that model.
        class_names: K class names (the subcategories), in class-id order.
        n_ctx: context length s of eq. 1 (TaI-DPT default 16).
        ctx_init_std: std of the context initialisation.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, class_names: list[str], n_ctx: int = 16,
                 ctx_init_std: float = 0.02):
        super().__init__()
        tower = text_tower(clip_model)
        width = tower.token_embedding.weight.shape[1]
        self.n_ctx = n_ctx
        self.ctx_global = nn.Parameter(torch.randn(n_ctx, width) * ctx_init_std)
        self.ctx_local = nn.Parameter(torch.randn(n_ctx, width) * ctx_init_std)
        token_ids = tokenizer([class_prompt_text(c, n_ctx) for c in class_names]).long()
        with torch.no_grad():
            embedded = tower.token_embedding(token_ids)
        self.register_buffer("token_ids", token_ids, persistent=True)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=True)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:].clone(), persistent=True)
        self._clip = [clip_model]  # not a submodule: the owner registers the backbone once
        self._cached: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def n_positions(self) -> int:
        """Prompt positions the text tower needs: up to and including the last EOT (the argmax token id)."""
        return int(self.token_ids.argmax(dim=-1).max()) + 1

    def _prompts(self, ctx: torch.Tensor, n: int) -> torch.Tensor:
        """(K, n, W) prompt embeddings, cut to the first ``n`` positions."""
        k = self.prefix.shape[0]
        suffix = self.suffix[:, : n - 1 - self.n_ctx]
        return torch.cat([self.prefix, ctx.unsqueeze(0).expand(k, -1, -1).to(self.prefix.dtype), suffix], dim=1)

    def _encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        model, n = self._clip[0], self.n_positions
        ids = self.token_ids[:, :n]
        prompts = torch.cat([self._prompts(self.ctx_global, n), self._prompts(self.ctx_local, n)])
        pooled, _ = encode_text_embeddings(model, prompts, torch.cat([ids, ids]))  # one pass for both: (2K, D)
        return pooled[: len(ids)], pooled[len(ids):]

    def _state_key(self) -> tuple | None:
        """Identifies the contexts' current values; None when the text tower itself is trainable."""
        if any(p.requires_grad for p in text_tower(self._clip[0]).parameters()):
            return None
        return tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in (self.ctx_global, self.ctx_local))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (G, L), each (K, D), not normalised."""
        key = None if torch.is_grad_enabled() else self._state_key()
        if key is None:
            self._cached = None
            return self._encode()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._encode())
        return self._cached[1]
