"""Cross-modal attention prototype classifier (CMPA-DGPL §3.3, eqs. 6-7)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from popstack.lightning_modules.backbone import float32

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of its learned logit scale
NORM_EPS = 1e-12  # F.normalize's floor on a norm


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in its own dtype when that is wider (float64 in checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class CrossModalPrototypeClassifier(nn.Module):
    """[x~, V~, T~] = LayerNorm(s + SelfAttn(s)), s = [P_I(x); P_I(V_1..K); P_T(T_1..K)];
    logits cos(x~, V~_i)/tau_v, cos(x~, T~_i)/tau_t.

    The paper's eq. 6 writes P_I(T), but §3.3 defines P_T as *the* projection of textual features into the shared
    space; the textual prototypes are CLIP text features, so they go through P_T (image x and visual prototypes V
    through P_I). The attention block is residual (x + MHA(x)), the usual transformer form, so the projected
    features survive when attention is uninformative early in training.

    The 2K prototype tokens are the same for every post, so nothing of size (B, K, d) is built:

    - ``attend``: the prototypes' attention among themselves once per batch, then each post's one extra key as a
      two-way mix per head, so every attended prototype token is z = c + sum_h alpha_h (a_h - w_h) with c, w_h
      per prototype, a_h per post and alpha (B, 2K, H) the mixing weights;
    - ``SharedTokens``: the LayerNorm'd tokens' cosines with x~ and their posterior means from inner products of
      those few vectors (Gram matrices), at O(B K H^2 d) in matrix products.

    It is the same function as ``nn.MultiheadAttention`` + ``nn.LayerNorm`` over the (B, 1 + 2K, d) sequence
    (whose weights it holds, so checkpoints are unchanged; ``tests/test_prompt_prototype.py`` checks outputs and
    gradients against that form).

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

        Returns: ``x`` (B, d) the attended image feature x~; ``cos_v``, ``cos_t`` (B, K) cosines of x~ with each
        attended visual / textual prototype V~_i, T~_i; ``logits_v``, ``logits_t``, ``logits`` (B, K) with
        ``logits`` = (logits_v + logits_t) / 2 (the averaged logits of L_c); ``v_tilde``, ``t_tilde`` (B, d):
        sum_i p_i V~_i and sum_i q_i T~_i with p = softmax(logits_v), q = softmax(logits_t), the post's own class
        posteriors (its V~ and T~ summarised in d numbers).
        """
        k = visual.shape[0]
        post = self.proj_image(x)
        shared = torch.cat([self.proj_image(visual), self.proj_text(textual)])
        post_out, tokens = self.attend(post, shared)
        x_t = self.norm(post + post_out)
        with float32(x_t):  # the Gram terms subtract large inner products: bf16 would lose them
            r = tokens.scales(self.norm)
            cos = tokens.cosines(at_least_float32(x_t), self.norm, r)
            cos_v, cos_t = cos[:, :k], cos[:, k:]
            logits_v = cos_v * self.log_scale_v.exp().clamp(max=MAX_LOGIT_SCALE)
            logits_t = cos_t * self.log_scale_t.exp().clamp(max=MAX_LOGIT_SCALE)
            weights = torch.cat([logits_v.softmax(-1), logits_t.softmax(-1)], dim=1)
            v_tilde, t_tilde = tokens.weighted_means(weights, self.norm, r, split=k)
        return {"x": x_t, "cos_v": cos_v, "cos_t": cos_t, "logits_v": logits_v, "logits_t": logits_t,
                "logits": (logits_v + logits_t) / 2, "v_tilde": v_tilde, "t_tilde": t_tilde}

    def attend(self, post: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, "SharedTokens"]:
        """``self.attention`` over each post's sequence [post_b; shared_1..N], without building B copies of it.

        post (B, d): one token per post; shared (N, d): tokens every sequence holds. Returns the attention output
        (B, d) at the post token and the residual shared tokens shared + attention output as ``SharedTokens``.
        A shared token's query attends to the N shared keys (the same for every post: one (N, N) softmax with
        log-normaliser S) and to the post's key (logit c), so its output is alpha v_post + (1 - alpha) u per head,
        alpha = sigmoid(c - S), with u the shared-keys-only output.
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
        alpha = torch.sigmoid(at_least_float32(to_post) - at_least_float32(among).logsumexp(-1).T)
        u_out = torch.einsum("nhe,dhe->nhd", u, w_out)  # (N, H, d): each head's shared-only output, projected
        return post_out, SharedTokens(
            base=shared + u_out.sum(1) + mha.out_proj.bias, from_shared=u_out,
            from_post=torch.einsum("bhe,dhe->bhd", v_p, w_out), alpha=alpha)


class SharedTokens:
    """The B x N residual shared tokens z_bn = base_n + sum_h alpha_bnh (from_post_bh - from_shared_nh), held as
    their pieces: base (N, d), from_shared (N, H, d), from_post (B, H, d), alpha (B, N, H).

    What the classifier needs of LayerNorm(z) (cosines, posterior means) is computed from the pieces centred over d
    (LayerNorm's mean removal is linear, so z - mean(z) is the same mix of the centred pieces) and their inner
    products, in at least float32.
    """

    def __init__(self, base: torch.Tensor, from_shared: torch.Tensor, from_post: torch.Tensor, alpha: torch.Tensor):
        def centred(t):
            t = at_least_float32(t)
            return t - t.mean(-1, keepdim=True)

        self.base, self.from_shared, self.from_post = centred(base), centred(from_shared), centred(from_post)
        self.alpha = at_least_float32(alpha)

    def _dot(self, v: torch.Tensor) -> torch.Tensor:
        """<v_b, z_bn - mean> (B, N) for one vector per post, v (B, d)."""
        mixed = torch.einsum("bhd,bd->bh", self.from_post, v).unsqueeze(1) - torch.einsum("nhd,bd->bnh",
                                                                                        self.from_shared, v)
        return v @ self.base.T + (self.alpha * mixed).sum(-1)

    def _squared_norm(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """||scale * (z_bn - mean)||^2 (B, N), scale (d,) or None (= 1)."""
        c, w, a = ((t if scale is None else t * scale) for t in (self.base, self.from_shared, self.from_post))
        al = self.alpha
        cc = (c * c).sum(-1)  # (N,)
        cw = torch.einsum("nd,nhd->nh", c, w)
        ca = torch.einsum("nd,bhd->bnh", c, a)
        # ||sum_h al_h (a_h - w_h)||^2 = sum_hg al_h al_g (<w_h, w_g> + <a_h, a_g> - 2 <w_h, a_g>)
        gram = (torch.einsum("nhd,ngd->nhg", w, w) + torch.einsum("bhd,bgd->bhg", a, a).unsqueeze(1)
                - 2 * torch.einsum("nhd,bgd->bnhg", w, a))  # (B, N, H, H)
        quad = (al.unsqueeze(-1) * al.unsqueeze(-2) * gram).sum((-2, -1))
        return cc + 2 * (al * (ca - cw)).sum(-1) + quad

    def scales(self, norm: nn.LayerNorm) -> torch.Tensor:
        """(B, N) r = 1 / sqrt(var + eps): LayerNorm's division of each token (computed once per forward: it costs
        the largest Gram product)."""
        d = self.base.shape[-1]
        return (self._squared_norm().clamp(min=0) / d + norm.eps).rsqrt()

    def cosines(self, x: torch.Tensor, norm: nn.LayerNorm, r: torch.Tensor) -> torch.Tensor:
        """(B, N) cos(x_b, LayerNorm(z_bn)) for x (B, d), with ``norm``'s weight g and bias beta:
        LayerNorm(z) = g * z0 * r + beta (z0 = z - mean, r = ``scales(norm)``)."""
        g, beta = at_least_float32(norm.weight), at_least_float32(norm.bias)
        dot = self._dot(x * g) * r + (x @ beta).unsqueeze(-1)
        gb = (g * beta).expand(len(x), -1)
        sq = self._squared_norm(g).clamp(min=0) * r * r + 2 * self._dot(gb) * r + (beta * beta).sum()
        return dot / (x.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS) * sq.clamp(min=0).sqrt().clamp(min=NORM_EPS))

    def weighted_means(self, weights: torch.Tensor, norm: nn.LayerNorm, r: torch.Tensor,
                       split: int) -> tuple[torch.Tensor, ...]:
        """sum_n weights_bn LayerNorm(z_bn) over tokens [:split] and [split:], each (B, d); weights (B, N),
        r = ``scales(norm)``."""
        g, beta = at_least_float32(norm.weight), at_least_float32(norm.bias)
        rw = weights * r  # (B, N)
        means = []
        for part in (slice(None, split), slice(split, None)):
            r, al = rw[:, part], self.alpha[:, part]
            z = (r @ self.base[part] + torch.einsum("bnh,bhd->bd", r.unsqueeze(-1) * al, self.from_post)
                 - torch.einsum("bnh,nhd->bd", r.unsqueeze(-1) * al, self.from_shared[part]))
            means.append(g * z + weights[:, part].sum(-1, keepdim=True) * beta)
        return tuple(means)
