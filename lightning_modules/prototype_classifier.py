"""Cross-modal attention prototype classifier (CMPA-DGPL §3.3, eqs. 6-7)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of its learned logit scale


class CrossModalPrototypeClassifier(nn.Module):
    """[x~, V~, T~] = SelfAttn([P_I(x); P_I(V_1..K); P_T(T_1..K)]); logits cos(x~, V~_i)/tau_v, cos(x~, T~_i)/tau_t.

    The paper's eq. 6 writes P_I(T), but §3.3 defines P_T as *the* projection of textual features into the shared
    space; the textual prototypes are CLIP text features, so they go through P_T (image x and visual prototypes V
    through P_I). The attention block is residual (x + MHA(x)), the usual transformer form, so the projected
    features survive when attention is uninformative early in training.

    Args:
        embed_dim: CLIP embedding dim D of x, V, T.
        proj_dim: shared space dim d.
        heads: attention heads (d must be divisible by heads).
        tau_v, tau_t: initial temperatures (learned, in log space, scale clamped at 100).
    """

    def __init__(self, embed_dim: int, proj_dim: int = 256, heads: int = 4, tau_v: float = 0.07,
                 tau_t: float = 0.07, dropout: float = 0.0):
        super().__init__()
        self.proj_image = nn.Linear(embed_dim, proj_dim)
        self.proj_text = nn.Linear(embed_dim, proj_dim)
        self.attention = nn.MultiheadAttention(proj_dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(proj_dim)
        self.log_scale_v = nn.Parameter(torch.tensor(math.log(1.0 / tau_v)))
        self.log_scale_t = nn.Parameter(torch.tensor(math.log(1.0 / tau_t)))

    def forward(self, x: torch.Tensor, visual: torch.Tensor, textual: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, D) image features; visual, textual (K, D) prototypes.

        Returns: ``x`` (B, d), ``V`` (B, K, d), ``T`` (B, K, d) attended features; ``cos_v``, ``cos_t`` (B, K)
        cosines of x~ with each attended prototype; ``logits_v``, ``logits_t``, ``logits`` (B, K) with
        ``logits`` = (logits_v + logits_t) / 2 (the averaged logits of L_c).
        """
        b, k = x.shape[0], visual.shape[0]
        seq = torch.cat([
            self.proj_image(x).unsqueeze(1),
            self.proj_image(visual).unsqueeze(0).expand(b, -1, -1),
            self.proj_text(textual).unsqueeze(0).expand(b, -1, -1),
        ], dim=1)
        attended, _ = self.attention(seq, seq, seq, need_weights=False)
        seq = self.norm(seq + attended)
        x_t, v_t, t_t = seq[:, 0], seq[:, 1:1 + k], seq[:, 1 + k:]
        xn = F.normalize(x_t.float(), dim=-1).unsqueeze(1)
        cos_v = (xn * F.normalize(v_t.float(), dim=-1)).sum(-1)
        cos_t = (xn * F.normalize(t_t.float(), dim=-1)).sum(-1)
        logits_v = cos_v * self.log_scale_v.exp().clamp(max=MAX_LOGIT_SCALE)
        logits_t = cos_t * self.log_scale_t.exp().clamp(max=MAX_LOGIT_SCALE)
        return {"x": x_t, "V": v_t, "T": t_t, "cos_v": cos_v, "cos_t": cos_t, "logits_v": logits_v,
                "logits_t": logits_t, "logits": (logits_v + logits_t) / 2}
