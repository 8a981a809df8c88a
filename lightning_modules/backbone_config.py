"""The frozen CLIP backbone's settings: the typed config of the Hydra group ``backbone/`` (its defaults and rules).

``configs/backbone/<name>.yaml`` holds only what differs from these defaults (the tiny test model's).
"""

from __future__ import annotations

from dataclasses import dataclass

from popstack.datamodules.typed import setting


@dataclass
class BackboneConfig:
    """name: open_clip model name (``popstack-tiny-clip`` is shipped in ``lightning_modules/model_configs``: random
        init, for the demo and tests).
    pretrained: null = random init; a local weights file, or an open_clip tag (``openai``).
    trainable_last_blocks: CLIP blocks (of each tower) trained with the prompt/prototype module; 0 = frozen, and the
        modules read the embedding cache instead of images.
    token_len: per-token text features cached for the local branch (ours; CMPA-DGPL eq. 3 keeps all l tokens,
        CLIP's context is 77).
    image_token_grid: last-layer patch tokens cached for the co-attention MLP, average-pooled to at most g x g
        (0 = none).
    embed_batch_size: posts per batch when the embedding cache is built.
    """

    name: str = setting("popstack-tiny-clip")
    pretrained: str | None = setting(None)
    trainable_last_blocks: int = setting(0, lo=0)
    token_len: int = setting(32, lo=1)
    image_token_grid: int = setting(4, lo=0)
    embed_batch_size: int = setting(256, lo=1)
