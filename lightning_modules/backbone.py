"""CLIP backbone loading (open_clip) without a network, freezing, and token-level text features.

``pretrained`` is one of: ``None``/``""`` (random init), a path to a local checkpoint file (a state_dict saved
with ``torch.save(model.state_dict(), path)`` or an open_clip release file), or an open_clip tag such as
``"openai"`` / ``"laion2b_s34b_b79k"`` (needs the network on first use; this environment has none).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from popstack.datamodules.shards import normalise_images

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODEL = "popstack-tiny-clip"


class BackboneWeightsError(RuntimeError):
    """Raised when pretrained weights are asked for but cannot be had (no file, no network)."""


def float32(x: torch.Tensor):
    """A region where autocast is off on ``x``'s device: what follows runs in the dtypes it is given (float32 once
    cast). Used for the outputs that bf16 would coarsen: the regression heads and their de-standardisation (bf16
    keeps 8 bits: predictions in [8, 16) would land on a 0.0625 grid) and the prompt learner's cosines, which are
    multiplied by the logit scale before a softmax."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def register_local_configs() -> None:
    """Register the model configs shipped in ``model_configs/`` (e.g. ``popstack-tiny-clip``) with open_clip."""
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)


def check_pretrained(model_name: str, pretrained: str | None) -> None:
    """Fail fast (before any other work) when ``pretrained`` names neither a file nor a usable tag.

    A tag is only usable when the network (or the Hugging Face cache) can serve it; with ``HF_HUB_OFFLINE=1``
    or no network the error names the local-file override.
    """
    register_local_configs()
    if model_name not in open_clip.list_models():
        raise BackboneWeightsError(f"unknown open_clip model {model_name!r}")
    if not pretrained:
        return
    if os.path.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
        if not Path(pretrained).is_file():
            raise BackboneWeightsError(f"backbone.pretrained file not found: {pretrained}")
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise BackboneWeightsError(
            f"{pretrained!r} is neither a file nor a pretrained tag of {model_name} (tags: {', '.join(tags) or 'none'})"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise BackboneWeightsError(
            f"cannot fetch {model_name}/{pretrained} weights (no network); download them elsewhere and pass "
            f"backbone.pretrained=/path/to/open_clip_model.bin"
        )


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the weights hub answers a TCP connection (tags download from it on first use)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@dataclass
class Backbone:
    """A loaded CLIP model with its image preprocessing and tokenizer."""

    model: nn.Module
    preprocess: object
    tokenizer: object
    embed_dim: int
    image_size: int
    context_length: int


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns on every random init; with ``pretrained=None`` that is what was asked for (the tiny demo
    model, or a module whose weights come from its own checkpoint), so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def model_image_size(model_name: str) -> int:
    """Side in pixels of the square images the open_clip model ``model_name`` takes (from its config, no weights)."""
    register_local_configs()
    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def load_backbone(model_name: str, pretrained: str | None = None, precision: str = "fp32") -> Backbone:
    """Build an open_clip model by name and load ``pretrained`` (tag, local file, or None for random init)."""
    register_local_configs()
    quiet = _DropRandomInitWarning()
    if not pretrained:
        logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained or None, precision=precision
        )
    except RuntimeError as err:  # open_clip raises RuntimeError for unknown tags / failed downloads
        raise BackboneWeightsError(
            f"could not load {model_name} weights {pretrained!r}: {err}. Pass backbone.pretrained=/path/to/file"
        ) from err
    finally:
        logging.getLogger().removeFilter(quiet)
    cfg = open_clip.get_model_config(model_name)
    return Backbone(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model_name),
        embed_dim=cfg["embed_dim"],
        image_size=model_image_size(model_name),
        context_length=cfg["text_cfg"].get("context_length", 77),
    )


def text_tower(model: nn.Module) -> nn.Module:
    """The module that owns token_embedding/transformer/ln_final/text_projection (CLIP or CustomTextCLIP)."""
    return getattr(model, "text", model)


def freeze(model: nn.Module, trainable_last_blocks: int = 0) -> None:
    """Freeze every CLIP weight, then unfreeze the last ``trainable_last_blocks`` residual blocks of each tower."""
    model.requires_grad_(False)
    if trainable_last_blocks <= 0:
        return
    for transformer in (model.visual.transformer, text_tower(model).transformer):
        for block in transformer.resblocks[-trainable_last_blocks:]:
            block.requires_grad_(True)


def encode_text_embeddings(
    model: nn.Module, embeddings: torch.Tensor, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the text tower from token *embeddings* (so learnable prompt vectors can be injected).

    Args:
        embeddings: (B, L, W) token embeddings (W = text width, L <= context length), positional embedding not yet
            added.
        token_ids: (B, L) int token ids of the same prompts; used only to find the pooled (EOT) position.

    Returns:
        pooled: (B, D) projected EOT feature (D = CLIP embed dim), not normalised.
        tokens: (B, L, D) every token's projected feature (after ln_final), not normalised.
    """
    tower = text_tower(model)
    cast_dtype = tower.transformer.get_cast_dtype()
    n = embeddings.shape[1]  # may be shorter than the context length (prompts cut after their EOT token)
    x = embeddings.to(cast_dtype) + tower.positional_embedding[:n].to(cast_dtype)
    mask = tower.attn_mask[:n, :n] if tower.attn_mask is not None else None
    x = tower.transformer(x, attn_mask=mask)
    x = tower.ln_final(x)
    projection = tower.text_projection
    if isinstance(projection, nn.Linear):
        tokens = projection(x)
    else:
        tokens = x @ projection
    eot = token_ids.argmax(dim=-1)
    pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), eot]
    return pooled, tokens


def encode_text_tokens(model: nn.Module, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled (B, D) and per-token (B, L, D) projected text features for tokenized text (B, L)."""
    tower = text_tower(model)
    return encode_text_embeddings(model, tower.token_embedding(token_ids), token_ids)


def padding_mask(token_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True where the token is real (not the 0 padding id)."""
    return token_ids != 0


def patch_grid(model: nn.Module) -> int:
    """Side of the image tower's patch grid (7 for ViT-B/32 at 224 px); ``ValueError`` for a tower without one."""
    grid = getattr(model.visual, "grid_size", None)
    if grid is None or not hasattr(model.visual, "output_tokens"):
        raise ValueError(f"{type(model.visual).__name__}: only ViT image towers give patch tokens")
    return int(grid[0])


def token_grid(model: nn.Module, grid: int) -> int:
    """The side of the image-token grid kept for ``grid`` asked: at most the tower's own patch grid."""
    return min(int(grid), patch_grid(model))


def encode_image_tokens(model: nn.Module, image: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled image embedding (B, D) and the last layer's patch tokens (B, g * g, D), both from one pass.

    Tokens are the tower's output tokens (after its final LayerNorm) through the same projection as the pooled
    feature, so they live in the D-dim embedding space; a patch grid wider than ``grid`` is average-pooled to
    ``grid`` x ``grid`` (``token_grid``) so the cache stays bounded for ViT-L/14 (16 x 16 patches)."""
    visual = model.visual
    g = token_grid(model, grid)
    before = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(image)
    finally:
        visual.output_tokens = before
    if getattr(visual, "proj", None) is not None:
        tokens = tokens @ visual.proj
    side = int(round(tokens.shape[1] ** 0.5))
    if side != g:
        maps = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        tokens = torch.nn.functional.adaptive_avg_pool2d(maps.float(), g).flatten(2).transpose(1, 2)
    return pooled, tokens


def encode_posts(
    model: nn.Module, image: torch.Tensor, text_ids: torch.Tensor, token_len: int, image_grid: int = 0,
    images: bool = True,
) -> dict[str, torch.Tensor]:
    """Frozen-backbone features of a batch of posts: the one place raw batches become embeddings.

    Used both by the embedding cache (computed once, reused for every fold and epoch) and by the neural modules
    when they are fed raw shard batches, so the two paths give the same numbers. Callers wrap it in
    ``torch.no_grad()`` when the backbone is frozen (the cache, and modules with no trainable CLIP block).

    Args:
        image: (B, 3, S, S) images: uint8 as the shard loaders deliver them (normalised here, on their device:
            ``datamodules.shards.normalise_images``) or float32 already normalised.
        text_ids: (B, C) token ids of the post text (C = context length, 0 = padding).
        token_len: number of leading token positions kept for the per-token features (<= C).
        image_grid: > 0: also the last layer's patch tokens, pooled to at most this grid (``encode_image_tokens``).
        images: False (a dataset without readable images): the image tower does not run; ``image_emb`` is zeros
            and there are no patch tokens.

    Returns (all float32 except the mask):
        image_emb: (B, D) CLIP image embedding (not normalised).
        text_emb: (B, D) pooled (EOT) text embedding (not normalised).
        text_tokens: (B, token_len, D) projected per-token text features.
        text_mask: (B, token_len) bool, True for real (non-padding) tokens.
        image_tokens: (B, g * g, D) projected patch tokens, only when ``image_grid`` > 0.
    """
    image_tokens = None
    text_emb, tokens = encode_text_tokens(model, text_ids)
    if not images:
        image_emb = torch.zeros_like(text_emb)
    elif image_grid > 0:
        image_emb, image_tokens = encode_image_tokens(model, normalise_images(image), image_grid)
    else:
        image_emb = model.encode_image(normalise_images(image))
    out = {
        "image_emb": image_emb.float(),
        "text_emb": text_emb.float(),
        "text_tokens": tokens[:, :token_len].float(),
        "text_mask": padding_mask(text_ids[:, :token_len]),
    }
    if image_tokens is not None:
        out["image_tokens"] = image_tokens.float()
    return out
