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

    The 2K prototype tokens are the same for every post, so the attention is computed in its factored form
    (``attend``): the prototypes' attention among themselves once per batch, then each post's one extra key and
    value. It is the same function as ``nn.MultiheadAttention`` over the (B, 1 + 2K, d) sequence (whose weights it
    holds, so checkpoints are unchanged) at O(K^2 d + B K d) instead of O(B K^2 d + B K d^2).

    Args:
        embed_dim: CLIP embedding dim D of x, V, T.
        proj_dim: shared space dim d.
        heads: attention heads (d must be divisible by heads).
        tau_v, tau_t: initial temperatures (learned, in log space, scale clamped at 100).
    """

    def __init__(self, embed_dim: int, proj_dim: int = 256, heads: int = 4, tau_v: float = 0.07,
                 tau_t: float = 0.07):
        super().__init__()
        self.proj_image = nn.Linear(embed_dim, proj_dim)
        self.proj_text = nn.Linear(embed_dim, proj_dim)
        self.attention = nn.MultiheadAttention(proj_dim, heads, batch_first=True)  # the weights ``attend`` uses
        self.norm = nn.LayerNorm(proj_dim)
        self.log_scale_v = nn.Parameter(torch.tensor(math.log(1.0 / tau_v)))
        self.log_scale_t = nn.Parameter(torch.tensor(math.log(1.0 / tau_t)))

    def forward(self, x: torch.Tensor, visual: torch.Tensor, textual: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, D) image features; visual, textual (K, D) prototypes.

        Returns: ``x`` (B, d), ``V`` (B, K, d), ``T`` (B, K, d) attended features; ``cos_v``, ``cos_t`` (B, K)
        cosines of x~ with each attended prototype; ``logits_v``, ``logits_t``, ``logits`` (B, K) with
        ``logits`` = (logits_v + logits_t) / 2 (the averaged logits of L_c).
        """
        k = visual.shape[0]
        post = self.proj_image(x)
        shared = torch.cat([self.proj_image(visual), self.proj_text(textual)])
        post_out, shared_out = self.attend(post, shared)
        seq = self.norm(torch.cat([(post + post_out).unsqueeze(1), shared + shared_out], dim=1))
        x_t, v_t, t_t = seq[:, 0], seq[:, 1:1 + k], seq[:, 1 + k:]
        xn = F.normalize(x_t.float(), dim=-1).unsqueeze(1)
        cos_v = (xn * F.normalize(v_t.float(), dim=-1)).sum(-1)
        cos_t = (xn * F.normalize(t_t.float(), dim=-1)).sum(-1)
        logits_v = cos_v * self.log_scale_v.exp().clamp(max=MAX_LOGIT_SCALE)
        logits_t = cos_t * self.log_scale_t.exp().clamp(max=MAX_LOGIT_SCALE)
        return {"x": x_t, "V": v_t, "T": t_t, "cos_v": cos_v, "cos_t": cos_t, "logits_v": logits_v,
                "logits_t": logits_t, "logits": (logits_v + logits_t) / 2}

    def attend(self, post: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self.attention`` over each post's sequence [post_b; shared_1..N], without building B copies of it.

        post (B, d): one token per post; shared (N, d): tokens every sequence holds. Returns the attention outputs
        (B, d) at the post token and (B, N, d) at the shared tokens. A shared token's query attends to the N shared
        keys (the same for every post: one (N, N) softmax with log-normaliser S) and to the post's key (logit c),
        so its output is sigmoid(c - S) v_post + (1 - sigmoid(c - S)) u, with u the shared-keys-only output.
        """
        mha = self.attention
        h = mha.num_heads
        w_out = mha.out_proj.weight.unflatten(1, (h, -1))  # (d, H, dh): each head's slice of the output projection

        def qkv(t):  # (..., d) -> query, key, value, each (..., H, dh)
            projected = F.linear(t, mha.in_proj_weight, mha.in_proj_bias)
            return [part.unflatten(-1, (h, -1)) for part in projected.chunk(3, -1)]

        (q_p, k_p, v_p), (q_s, k_s, v_s) = qkv(post), qkv(shared)
        scale = q_p.shape[-1] ** -0.5
        # the post's query over its own key and the N shared keys
        logits = torch.cat([(q_p * k_p).sum(-1, keepdim=True), torch.einsum("bhe,nhe->bhn", q_p, k_s)], -1) * scale
        weights = logits.softmax(-1)  # (B, H, 1 + N)
        post_heads = weights[..., :1] * v_p + torch.einsum("bhn,nhe->bhe", weights[..., 1:], v_s)
        post_out = mha.out_proj(post_heads.flatten(1))
        # the shared queries: over the shared keys once, then the post's key as a two-way mix per post
        among = torch.einsum("nhe,mhe->hnm", q_s, k_s) * scale  # (H, N, N)
        u = torch.einsum("hnm,mhe->nhe", among.softmax(-1), v_s)  # (N, H, dh)
        to_post = torch.einsum("nhe,bhe->bnh", q_s, k_p) * scale  # (B, N, H)
        full = torch.promote_types(u.dtype, torch.float32)  # the mixing weights at least at float32 resolution
        alpha = torch.sigmoid(to_post.to(full) - among.to(full).logsumexp(-1).T).to(u.dtype)
        v_p_out = torch.einsum("bhe,dhe->bhd", v_p, w_out)  # (B, H, d): each head's post value, projected
        u_out = torch.einsum("nhe,dhe->nhd", u, w_out)  # (N, H, d)
        shared_out = (torch.einsum("bnh,bhd->bnd", alpha, v_p_out) - torch.einsum("bnh,nhd->bnd", alpha, u_out)
                      + u_out.sum(1) + mha.out_proj.bias)
        return post_out, shared_out
