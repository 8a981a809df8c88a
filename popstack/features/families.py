"""Feature family names and the ablation groups of HyperFusion Table 1 (which families each variant drops)."""

from __future__ import annotations

USER, TEMPORAL, SPATIAL, CATEGORY, TEXT, SENTENCE, GLOVE, TARGET, CROSSMODAL, IMAGE_STATS = (
    "user", "temporal", "spatial", "category", "text", "sentence", "glove", "target", "crossmodal", "image_stats",
)
#: The user's own per-post columns a data source carries (``features.extra``; e.g. ``data=table``).
EXTRA = "extra"
#: Families produced by the neural stage (extract) that join the stack.
VISUAL, NEURAL_TEXT, PROMPT, NEURAL_PRED = "visual", "neural_text", "prompt", "neural_pred"

ABLATION_GROUPS: dict[str, tuple[str, ...]] = {
    "visual": (VISUAL, CROSSMODAL, PROMPT, IMAGE_STATS),
    "metadata": (USER, TEMPORAL, CATEGORY, TARGET),
    "textual": (TEXT, SENTENCE, GLOVE, NEURAL_TEXT),
    "geolocation": (SPATIAL,),
}


def column_name(family: str, name: str) -> str:
    """Stable feature column name, e.g. ``user__photo_count``."""
    return f"{family}__{name}"


def family_of(column: str) -> str:
    return column.split("__", 1)[0]
