"""PromptPrototypeModule: the CMPA-DGPL model as a LightningModule (frozen CLIP + prompts + prototypes).

Loss (paper eq. 8): L = L_g + L_o + L_c, cross-entropy on the global prompt logits, the local prompt logits and
the averaged prototype logits (posts of a class unknown to training, id -1, are ignored), plus an optional
popularity head (Huber, weight ``regression_weight``; 0 switches it off) so the module's predictions can join the
stack. Prototypes come from ``set_prototypes`` (computed by the caller from the training fold) and are buffers,
so they travel in the checkpoint.

The feature vector F (paper eq. 11: [f_I(x), f_T(t), w^G, w^L, x~, V~, T~, s]) comes from ``predict_step``, one
block per symbol:

* ``f_i`` / ``f_t`` (B, D): the CLIP image and text features the module read (the frozen cache, or its own partly
  tuned CLIP when ``trainable_last_blocks`` > 0: the classification-tuned f_I, f_T of §4.1.3);
* ``w_g`` / ``w_l`` (B, K): the post's global / local prompt similarities to each class (eqs. 4-5, before the
  temperature): G_i and L_i (eq. 2) are class embeddings, the same for every post, so the post-level trace of the
  global and local prompt features is its similarity to them;
* ``x_tilde`` (B, d): the attended image feature of eq. 6;
* ``v_tilde`` / ``t_tilde`` (B, d): the attended visual / textual prototypes of eq. 6, one (K, d) matrix per post
  (77 x 256 each on SMPD: about 39k floats a post, 76 GB at 486k posts in float32), summarised by the post's own
  class posterior of eq. 7 (sum_i p_V(i) V~_i and sum_i p_T(i) T~_i): the prototype the post is attended to.

s (user behaviour) is the tabular feature table. A column is only usable by the tree members if it means the same
thing in every row, so the pipeline takes F from one classification-only model (``regression_weight`` 0: no
popularity label) trained on every post with a known subcategory (``pipeline.neural``): one shared space for all
posts. Per-post ``class_loss`` (the eq. 8 cross-entropy terms summed per post, NaN for a class unknown to training)
ranks rows for loss-based sample selection (§4.2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from popstack.lightning_modules.backbone import float32
from popstack.lightning_modules.base import PostModule
from popstack.lightning_modules.losses import huber_loss
from popstack.lightning_modules.prompt_learner import DualGrainedPromptLearner, global_similarity, local_similarity
from popstack.lightning_modules.prototype_classifier import CrossModalPrototypeClassifier

IGNORE = -1
#: The F blocks of eq. 11 that ``predict_step`` emits, in order (s is the tabular table).
F_BLOCKS = ("f_i", "f_t", "w_g", "w_l", "x_tilde", "v_tilde", "t_tilde")


class PromptPrototypeModule(PostModule):
    """Args (all plain values, saved as hyper-parameters):

    class_names: the K subcategory names in class-id order.
    backbone_name / backbone_pretrained / trainable_last_blocks: the CLIP model (frozen by default).
    n_ctx, ctx_init_std: prompt contexts (eq. 1). tau: temperature of the global/local prompt logits;
    tau_s: token softmax temperature (eq. 5); learn_tau: learn both (log space).
    proj_dim, heads, tau_v, tau_t: the prototype classifier (eqs. 6-7).
    regression_weight, huber_delta, regression_hidden: the auxiliary popularity head, which predicts
    (y - target_mean) / target_std (training-label statistics given by the caller).
    lr, weight_decay, scheduler: AdamW (paper: 1e-4, 1e-5). prompt_lr: learning rate of the prompt contexts and
    the prompt temperatures (None = ``lr``); context vectors are inputs of a frozen text tower and usually want a
    larger step than the projection/attention/head weights. token_len: per-token features for raw batches.
    """

    #: its text side (prompts, w_g, w_l, f_t) still learns without images; these blocks are functions of the image
    #: (x~ attends from the image feature, V~ and T~ are weighted by the image's class posterior), so without a
    #: readable image they are the same for every post
    image_f_blocks = ("f_i", "x_tilde", "v_tilde", "t_tilde")

    def __init__(
        self,
        class_names: list[str],
        backbone_name: str = "popstack-tiny-clip",
        backbone_pretrained: str | None = None,
        trainable_last_blocks: int = 0,
        n_ctx: int = 16,
        ctx_init_std: float = 0.02,
        tau: float = 0.25,
        tau_s: float = 0.02,
        learn_tau: bool = False,
        proj_dim: int = 256,
        heads: int = 4,
        tau_v: float = 0.07,
        tau_t: float = 0.07,
        regression_weight: float = 1.0,
        huber_delta: float = 1.0,
        regression_hidden: int = 256,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        scheduler: str = "cosine",
        prompt_lr: float | None = None,
        token_len: int = 32,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._init_backbone(backbone_name, backbone_pretrained, trainable_last_blocks)
        k = len(class_names)
        embed_dim = self.clip.text_projection.shape[1] if isinstance(self.clip.text_projection, torch.Tensor) \
            else self.clip.text_projection.out_features
        self.prompts = DualGrainedPromptLearner(self.clip, self.tokenizer, list(class_names), n_ctx, ctx_init_std)
        self.classifier = CrossModalPrototypeClassifier(embed_dim, proj_dim, heads, tau_v, tau_t)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / tau)), requires_grad=learn_tau)
        self.log_inv_tau_s = nn.Parameter(torch.tensor(math.log(1 / tau_s)), requires_grad=learn_tau)
        self.register_buffer("visual_prototypes", torch.zeros(k, embed_dim))
        self.register_buffer("textual_prototypes", torch.zeros(k, embed_dim))
        self.register_buffer("prototypes_set", torch.tensor(False))
        head_in = proj_dim + 2 * k + 2 * embed_dim
        self.regressor = nn.Sequential(
            nn.Linear(head_in, regression_hidden), nn.GELU(), nn.Linear(regression_hidden, 1)
        ) if regression_weight > 0 else None
        self.val_acc = MulticlassAccuracy(num_classes=k, ignore_index=IGNORE, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes=k, top_k=min(5, k), ignore_index=IGNORE, average="micro")
        self.val_acc_proto = MulticlassAccuracy(num_classes=k, ignore_index=IGNORE, average="micro")
        self._init_regression_metrics()

    def param_groups(self) -> list[dict]:
        """Prompt contexts and prompt temperatures at ``prompt_lr``, everything else trainable at ``lr``."""
        prompt = [self.prompts.ctx_global, self.prompts.ctx_local, self.log_scale, self.log_inv_tau_s]
        prompt_ids = {id(p) for p in prompt}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in prompt_ids]
        lr = self.hparams.prompt_lr if self.hparams.prompt_lr is not None else self.hparams.lr
        return [{"params": rest}, {"params": [p for p in prompt if p.requires_grad], "lr": lr}]

    @property
    def n_classes(self) -> int:
        return len(self.hparams.class_names)

    def set_prototypes(self, visual: torch.Tensor, textual: torch.Tensor) -> None:
        """Visual and textual prototypes, (K, D) each (see ``lightning_modules.prototypes``)."""
        if visual.shape != self.visual_prototypes.shape or textual.shape != self.textual_prototypes.shape:
            raise ValueError(f"prototypes must be {tuple(self.visual_prototypes.shape)}, got "
                             f"{tuple(visual.shape)} and {tuple(textual.shape)}")
        self.visual_prototypes.copy_(torch.as_tensor(visual, dtype=torch.float32))
        self.textual_prototypes.copy_(torch.as_tensor(textual, dtype=torch.float32))
        self.prototypes_set.fill_(True)

    def class_name_features(self) -> torch.Tensor:
        """(K, D) CLIP text features of the plain class names: the prototype fallback for empty classes."""
        names = [n.replace(",", " ") for n in self.hparams.class_names]
        with torch.no_grad():
            return self.clip.encode_text(self.tokenizer(names).to(self.device)).float()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Cached or raw batch -> outputs (B = batch, K = classes, D = CLIP dim, d = proj_dim):

        ``global_logits``, ``local_logits``, ``proto_logits``, ``logits_v``, ``logits_t`` (B, K); ``x`` (B, d);
        ``V``, ``T`` (B, K, d);
        ``image_emb``, ``text_emb`` (B, D); ``global_sim``, ``local_sim``, ``cos_v`` (B, K) cosines before the
        temperature;
        ``prediction`` (B,) popularity, only when the popularity head is on.
        """
        if not bool(self.prototypes_set):
            raise RuntimeError("call set_prototypes(visual, textual) before using PromptPrototypeModule")
        b = self.encode(batch)
        g, loc = self.prompts()
        scale = self.log_scale.exp()
        global_sim = global_similarity(b["text_emb"], g)
        local_sim = local_similarity(b["text_tokens"], b["text_mask"].bool(), loc, 1 / self.log_inv_tau_s.exp())
        global_logits, local_logits = scale * global_sim, scale * local_sim
        proto = self.classifier(b["image_emb"].float(), self.visual_prototypes, self.textual_prototypes)
        out = {"global_logits": global_logits, "local_logits": local_logits, "proto_logits": proto["logits"],
               "logits_v": proto["logits_v"], "logits_t": proto["logits_t"], "cos_v": proto["cos_v"],
               "global_sim": global_sim, "local_sim": local_sim,
               "x": proto["x"], "V": proto["V"], "T": proto["T"], "image_emb": b["image_emb"].float(),
               "text_emb": b["text_emb"].float()}
        if self.regressor is not None:
            with float32(global_logits):  # the popularity head and its de-standardisation at full resolution
                feats = torch.cat([proto["x"].float(), global_logits.softmax(-1), local_logits.softmax(-1),
                                   out["image_emb"], out["text_emb"]], dim=-1)
                z = self.regressor(feats).squeeze(-1)
                out["prediction"] = z * self.hparams.target_std + self.hparams.target_mean
        return out

    def _class_targets(self, batch: dict) -> torch.Tensor:
        y = batch["subcategory_id"].long()
        return torch.where(y < self.n_classes, y, torch.full_like(y, IGNORE))

    def losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        y = self._class_targets(batch)
        has_class = bool((y != IGNORE).any())

        def ce(logits):
            return F.cross_entropy(logits.float(), y, ignore_index=IGNORE) if has_class else logits.sum() * 0.0

        parts = {"l_g": ce(out["global_logits"]), "l_o": ce(out["local_logits"]), "l_c": ce(out["proto_logits"])}
        total = parts["l_g"] + parts["l_o"] + parts["l_c"]
        if self.regressor is not None:
            parts["l_reg"] = huber_loss(out["prediction"], batch["label"], self.hparams.huber_delta)
            total = total + self.hparams.regression_weight * parts["l_reg"]
        parts["loss"] = total
        return parts

    def per_post_class_loss(self, out: dict, batch: dict) -> torch.Tensor:
        """(B,) L_g + L_o + L_c of each post (eq. 8 without the batch mean); NaN where the class is unknown."""
        y = self._class_targets(batch)
        known = y != IGNORE
        safe = torch.where(known, y, torch.zeros_like(y))
        loss = sum(F.cross_entropy(out[k].float(), safe, reduction="none")
                   for k in ("global_logits", "local_logits", "proto_logits"))
        return torch.where(known, loss, torch.full_like(loss, float("nan")))

    @staticmethod
    def class_scores(out: dict) -> torch.Tensor:
        """(B, K) fused class scores: the sum of the log-probabilities of the global prompt, local prompt and
        prototype heads (each trained by its own cross-entropy term of eq. 8)."""
        return sum(out[k].float().log_softmax(-1) for k in ("global_logits", "local_logits", "proto_logits"))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        parts = self.losses(out, batch)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, on_step=True, on_epoch=True,
                      batch_size=len(batch["label"]))
        return parts["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        parts = self.losses(out, batch)
        self.log("val/loss", parts["loss"], on_epoch=True, sync_dist=True, batch_size=len(batch["label"]))
        y = self._class_targets(batch)
        fused = self.class_scores(out)
        self.val_acc.update(fused, y)
        self.val_top5.update(fused, y)
        self.val_acc_proto.update(out["proto_logits"], y)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val/top5", self.val_top5, on_epoch=True)
        self.log("val/acc_proto", self.val_acc_proto, on_epoch=True)
        if self.regressor is not None:
            self.log_regression(out["prediction"], batch["label"], "val")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Per post: the predicted class, the per-post class loss, the F blocks of eq. 11 (``F_BLOCKS``, see the
        module docstring) and, when the popularity head is on, ``prediction``."""
        out = self(batch)
        result = {"post_id": list(batch["post_id"]), "class_pred": self.class_scores(out).argmax(-1),
                  "class_loss": self.per_post_class_loss(out, batch), **self.f_blocks(out)}
        if "prediction" in out:
            result["prediction"] = out["prediction"].float()
        return result

    @staticmethod
    def f_blocks(out: dict) -> dict[str, torch.Tensor]:
        """The F blocks of eq. 11 from ``forward``'s outputs (``F_BLOCKS`` order; the module docstring says what
        each holds)."""
        p_v = out["logits_v"].float().softmax(-1).unsqueeze(-1)
        p_t = out["logits_t"].float().softmax(-1).unsqueeze(-1)
        return {"f_i": out["image_emb"].float(), "f_t": out["text_emb"].float(),
                "w_g": out["global_sim"].float(), "w_l": out["local_sim"].float(), "x_tilde": out["x"].float(),
                "v_tilde": (p_v * out["V"].float()).sum(1), "t_tilde": (p_t * out["T"].float()).sum(1)}
