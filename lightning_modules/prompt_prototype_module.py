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

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from popstack.datamodules.typed import setting
from popstack.features.families import NEURAL_TEXT, PROMPT, VISUAL
from popstack.lightning_modules.backbone import float32
from popstack.lightning_modules.base import PostModule
from popstack.lightning_modules.losses import huber_loss
from popstack.lightning_modules.prompt_learner import DualGrainedPromptLearner, global_similarity, local_similarity
from popstack.lightning_modules.prototype_classifier import CrossModalPrototypeClassifier
from popstack.lightning_modules.prototypes import prototype_means, select_prototype_posts
from popstack.lightning_modules.registry import (
    BuildContext,
    ModuleConfig,
    ModuleSpec,
    hyperparameters,
    register_module,
)

log = logging.getLogger("popstack")

IGNORE = -1
#: The F blocks of eq. 11 that ``predict_step`` emits, in order (s is the tabular table).
F_BLOCKS = ("f_i", "f_t", "w_g", "w_l", "x_tilde", "v_tilde", "t_tilde")
#: The feature family each F block joins in the stack.
F_FAMILIES = {"f_i": VISUAL, "f_t": NEURAL_TEXT, **dict.fromkeys(F_BLOCKS[2:], PROMPT)}


@dataclass
class PromptPrototypeConfig(ModuleConfig):
    """``model.prompt_prototype``: the CMPA-DGPL module.

    Paper values: CMPA-DGPL §4.1.3 (AdamW, lr 1e-4, wd 1e-5, 4 epochs, batch 128), §3.1 (256 shots). The paper
    follows TaI-DPT for the prompts but gives no prompt length or temperatures: n_ctx 16, ctx_init_std 0.02,
    tau 0.25 (logit scale 4) and tau_s 1/50 are ours, taken from TaI-DPT's code. Ours too: learn_tau (learn tau
    and tau_s in log space; the paper does not say, TaI-DPT keeps them fixed), n_time_bins (temporal-diversity
    intervals of the prototype sampling, §3.1 says "several"), proj_dim (d of the shared space, §3.3 gives none),
    heads (attention heads of eq. 6), tau_v / tau_t (initial temperatures of eq. 7, learned; CLIP's initial
    temperature), the scheduler. regression_weight: the weight of an auxiliary popularity head, trained on one model
    per fold for a prediction column of the stack; 0 (the default) is the paper's classification-only module
    (eq. 8), whose knowledge reaches the stack through F alone, as in the paper (§4.2: F into LightGBM and
    CatBoost), and which trains one model instead of 1 + n_folds. F always comes from the one classification-only
    F model, whatever this weight (docs/reproduction.md).
    shots: posts per class prototype. regression_hidden: width of the popularity head. prompt_lr: learning rate
    of the prompt contexts and temperatures (null = lr).
    """

    epochs: int = setting(4, lo=1)
    lr: float = setting(1e-4, lo=0, lo_open=True)
    weight_decay: float = setting(1e-5, lo=0)
    n_ctx: int = setting(16, lo=1)
    ctx_init_std: float = setting(0.02, lo=0)
    tau: float = setting(0.25, lo=0, lo_open=True)
    tau_s: float = setting(0.02, lo=0, lo_open=True)
    learn_tau: bool = setting(True)
    shots: int = setting(256, lo=1)
    n_time_bins: int = setting(4, lo=1)
    proj_dim: int = setting(256, lo=1)
    heads: int = setting(4, lo=1)
    tau_v: float = setting(0.07, lo=0, lo_open=True)
    tau_t: float = setting(0.07, lo=0, lo_open=True)
    regression_weight: float = setting(0.0, lo=0)
    regression_hidden: int = setting(256, lo=1)
    prompt_lr: float | None = setting(None, lo=0, lo_open=True)


class PromptPrototypeModule(PostModule):
    """Args (all plain values, saved as hyper-parameters; the defaults are ``PromptPrototypeConfig``'s, the
    pipeline builds it with ``build``):

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
    #: it classifies posts into their subcategories: one class leaves nothing to learn (and no accuracy to measure)
    min_classes = 2

    def __init__(
        self,
        class_names: list[str],
        *,
        backbone_name: str,
        backbone_pretrained: str | None,
        trainable_last_blocks: int,
        n_ctx: int,
        ctx_init_std: float,
        tau: float,
        tau_s: float,
        learn_tau: bool,
        proj_dim: int,
        heads: int,
        tau_v: float,
        tau_t: float,
        regression_weight: float,
        huber_delta: float,
        regression_hidden: int,
        lr: float,
        weight_decay: float,
        scheduler: str,
        prompt_lr: float | None,
        token_len: int,
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
        ``v_tilde``, ``t_tilde`` (B, d) (the attended prototypes under the post's class posteriors);
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
               "x": proto["x"], "v_tilde": proto["v_tilde"], "t_tilde": proto["t_tilde"],
               "image_emb": b["image_emb"].float(), "text_emb": b["text_emb"].float()}
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
        return {"f_i": out["image_emb"].float(), "f_t": out["text_emb"].float(),
                "w_g": out["global_sim"].float(), "w_l": out["local_sim"].float(), "x_tilde": out["x"].float(),
                "v_tilde": out["v_tilde"].float(), "t_tilde": out["t_tilde"].float()}

    @classmethod
    def build(cls, config: PromptPrototypeConfig, ctx: BuildContext) -> "PromptPrototypeModule":
        """The module for one fit, with its prototypes: up to ``shots`` training posts per class
        (``select_prototype_posts``), averaged over the cached CLIP features (classes without training posts
        fall back to their class-name features). It always has its own CLIP copy (the prompts run through the
        text tower); the pipeline loads the run's weights into it."""
        module = cls(list(ctx.class_names), backbone_name=ctx.backbone_name, backbone_pretrained=None,
                     trainable_last_blocks=ctx.trainable_last_blocks, token_len=ctx.token_len,
                     target_mean=ctx.target_mean, target_std=ctx.target_std,
                     **hyperparameters(config, leave_out=("shots", "n_time_bins")))
        posts = ctx.posts(["postdate", "concept", "uid", "title", "alltags"])
        train = posts.iloc[ctx.train_idx].reset_index(drop=True).assign(
            subcategory_id=np.asarray(ctx.subcategory_id)[ctx.train_idx])
        chosen = select_prototype_posts(train, shots=config.shots, n_time_bins=config.n_time_bins, seed=ctx.seed)
        chosen = {c: ctx.train_idx[rows] for c, rows in chosen.items()}
        text_ok = ((posts.title.str.len() + posts.alltags.str.len()) > 0).to_numpy()
        visual, textual, filled = prototype_means(
            chosen, np.asarray(ctx.cache["image_emb"]), np.asarray(ctx.cache["text_emb"]), text_ok,
            np.asarray(ctx.cache["has_image"]), module.n_classes, module.class_name_features().cpu().numpy())
        if not filled.all():
            log.info("prompt_prototype: %d classes without training posts use class-name prototypes",
                     int((~filled).sum()))
        module.set_prototypes(torch.from_numpy(visual), torch.from_numpy(textual))
        return module


def _outputs(config: PromptPrototypeConfig) -> tuple[str, ...]:
    """``predict_step``'s outputs: class, per-post class loss, the F blocks and, with the head on, the prediction."""
    return ("class_pred", "class_loss", *F_BLOCKS, *(("prediction",) if config.regression_weight > 0 else ()))


register_module(ModuleSpec(
    name="prompt_prototype", module=PromptPrototypeModule, config=PromptPrototypeConfig,
    build=PromptPrototypeModule.build, monitor="val/loss", mode="min", outputs=_outputs, f_blocks=F_FAMILIES,
    # without the popularity head its only outputs (F, class loss) come from the F model
    fold_models=lambda config: config.regression_weight > 0,
    f_model={"regression_weight": 0.0},
))
