"""Class prototypes (CMPA-DGPL §3.1): diversity-aware choice of up to ``shots`` posts per class, then means.

Selection per class, in three stages as the paper describes:

1. temporal: the class's posts are split into ``n_time_bins`` equal-width intervals of the posting timeline;
   each interval gets a share of the shots proportional to its share of the class's posts (largest remainder);
2. subtopic: inside an interval, posts are taken round-robin over the Concept values, so every subtopic is
   covered before any repeats;
3. user: inside a subtopic, posts of users not chosen yet come first (round-robin over users).

Ties are broken by a seeded shuffle, so the choice is deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _round_robin(groups: list[list[int]]) -> list[int]:
    order: list[int] = []
    depth = max((len(g) for g in groups), default=0)
    for i in range(depth):
        order.extend(g[i] for g in groups if i < len(g))
    return order


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` shots over bins proportionally to ``sizes`` (largest remainder, capped by size)."""
    total = min(total, int(sizes.sum()))
    raw = sizes / sizes.sum() * total
    alloc = np.minimum(np.floor(raw).astype(int), sizes)
    for i in np.argsort(-(raw - np.floor(raw))):
        if alloc.sum() >= total:
            break
        if alloc[i] < sizes[i]:
            alloc[i] += 1
    while alloc.sum() < total:  # caps left shots over: give them to bins with room
        alloc[np.argmax(sizes - alloc)] += 1
    return alloc


def select_prototype_posts(
    posts: pd.DataFrame, class_column: str = "subcategory_id", shots: int = 256, n_time_bins: int = 4,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Row positions (into ``posts``) chosen per class id; pass training-fold rows only.

    ``posts`` needs ``postdate``, ``concept``, ``uid`` and ``class_column`` (ids; negative ids are skipped).
    """
    rng = np.random.default_rng(seed)
    positions = np.arange(len(posts))
    chosen: dict[int, np.ndarray] = {}
    for cls, idx in pd.Series(positions).groupby(posts[class_column].to_numpy()):
        if cls < 0:
            continue
        idx = idx.to_numpy()
        idx = idx[rng.permutation(len(idx))]
        times = posts["postdate"].to_numpy()[idx]
        edges = np.linspace(times.min(), times.max() + 1, n_time_bins + 1)
        bins = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, n_time_bins - 1)
        sizes = np.bincount(bins, minlength=n_time_bins)
        picks: list[int] = []
        for b, quota in enumerate(_allocate(sizes, shots)):
            if quota == 0:
                continue
            in_bin = idx[bins == b]
            concepts = posts["concept"].to_numpy()[in_bin]
            uids = posts["uid"].to_numpy()[in_bin]
            per_concept = []
            for c in pd.unique(concepts):
                members = in_bin[concepts == c]
                member_uids = uids[concepts == c]
                per_user = [members[member_uids == u].tolist() for u in pd.unique(member_uids)]
                per_concept.append(_round_robin(per_user))  # new users first
            picks.extend(_round_robin(per_concept)[:quota])
        chosen[int(cls)] = np.asarray(picks, dtype=np.int64)
    return chosen


def prototype_means(
    chosen: dict[int, np.ndarray], image_emb: np.ndarray, text_emb: np.ndarray, text_ok: np.ndarray,
    image_ok: np.ndarray, n_classes: int, fallback_text: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visual and textual prototypes (K, D): means of the chosen posts' CLIP image / text features.

    Posts without an image are left out of the visual mean, posts with empty text out of the textual mean.
    A class with no usable post falls back to ``fallback_text`` (K, D) -- the CLIP text feature of its class
    name -- for both prototypes; ``filled`` (K,) bool says which classes had a usable post for either prototype
    (without images, a class with texts is filled: its textual prototype is real, its visual one the fallback).
    """
    visual = np.array(fallback_text, dtype=np.float32, copy=True)
    textual = np.array(fallback_text, dtype=np.float32, copy=True)
    filled = np.zeros(n_classes, dtype=bool)
    for cls, rows in chosen.items():
        if cls >= n_classes or len(rows) == 0:
            continue
        img_rows = rows[image_ok[rows]]
        txt_rows = rows[text_ok[rows]]
        if len(img_rows):
            visual[cls] = image_emb[img_rows].mean(0)
        if len(txt_rows):
            textual[cls] = text_emb[txt_rows].mean(0)
        filled[cls] = bool(len(img_rows) or len(txt_rows))
    return visual, textual, filled
