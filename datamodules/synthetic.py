"""Synthetic SMPD: a complete directory in the real SMPD layout with a known latent popularity model.

    python -m popstack.datamodules.synthetic OUT --n-train 2000 --n-test 800 --seed 0

Latent model (per post i of user u, subcategory c, posted at hour h on weekday d)::

    signal_i = 6.0 + user_u + sub_c + 0.9 * appeal_i + tags_i + 0.25 * sin(2 pi (h - 14) / 24)
               + 0.15 * [d in weekend] + 0.4 * [has geo] * (geoaccuracy_i / 16)
    label_i  = round(clip(signal_i + noise_i, 1, 16.5), 2),   noise_i ~ N(0, 0.9^2)

* ``user_u ~ N(0, 1.9^2)``: the dominant factor, as in SMPD (HyperFusion Table 2). Users' ``photo_count`` and
  ``ispro`` correlate with it; heavy users post more.
* ``sub_c ~ N(0, 0.7^2)``: subcategory effect; each subcategory also has its own tag/title vocabulary.
* ``appeal_i ~ N(0, 1)``: image content. It is drawn into the image (object size, brightness and saturation),
  while the subcategory picks the palette and the shape, so a vision model can learn both the class and part of
  the popularity from pixels alone.
* ``tags_i = 0.15 * (#"hot" tags) - 0.1 * [no tags]``: some tags of every vocabulary are "hot".

``signal`` (noise-free) is written to ``signal.parquet`` so benchmarks know the achievable ceiling
(SRC(signal, label) is the best any model can do). The mess of real data is included: a few missing and
truncated images, empty titles and tags, no-geo posts (``"0"`` and ``""``), ``"None"`` path aliases and null
user fields. Output is deterministic per seed.

Worlds (``world=N``, ``datamodules.synthetic_worlds``): world 0 is the model above, exactly; any other index draws
the structure of the latent model (which fields carry signal and how strongly, interactions, what in the image
carries it, how messy the data is) and writes it to ``world.json`` next to ``signal.parquet``. In a drawn world::

    signal_i = 6.4 + sum_f strength_f * z_f(i) + sum_k interaction_k * z_k(i)

with ``z`` the standardised term of each field family (user quality, subcategory effect, image cue, hot tags,
hot title words, time of day/week and trend, geotag accuracy) and of each interaction.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from popstack.datamodules.schema import COLUMNS, IMAGE_OK, VECTOR_COLUMNS
from popstack.datamodules.synthetic_worlds import N_OBJECTS, World, draw_world, standardised

#: The 11 SMPD categories and their 77 subcategories (as the SMPD release names them; commas stand for spaces).
TAXONOMY: dict[str, list[str]] = {
    "Fashion": ["Fashion", "Hair", "Jewelry", "Makeup", "Nails", "Piercings", "Guys,Fashion", "Girls,Fashion",
                "Tattoos", "Sneakers", "OOTD", "High,Heels", "Bracelets", "Earrings"],
    "Travel&Active&Sports": ["Soccer", "Gymnastics", "Football", "Travel", "Dance", "Skateboarding", "Cars",
                             "Baltimore", "Motorcycles", "Health,Fitness", "Baseball", "Bodybuilding", "Hockey",
                             "Sports", "San", "Cheerleading", "Running", "Seattle", "Denver", "Basketball", "Super"],
    "Entertainment": ["Movies", "Music", "Books", "Video&Games"],
    "Holiday&Celebrations": ["Birthday", "Party", "Wedding", "Thanksgiving", "Halloween", "Christmas", "New",
                             "Holidays"],
    "Food": ["Drinks", "Dessert", "Coffee", "Tea", "General"],
    "Whether&Season": ["Raining", "Sunny", "Cloudy", "Fall", "Snowing", "Summer", "Spring", "Winter"],
    "Animal": ["Horses", "Insects", "Fish", "Cats", "Dogs"],
    "Family": ["Babies", "Kids"],
    "Social&People": ["Love", "Friends", "Selfies", "Good,Morning", "Good", "Girls", "Guys"],
    "Urban": ["StreetArt", "Architecture"],
    "Electronics": ["Electronics"],
}
START_EPOCH = 1_420_070_400  # 2015-01-01 UTC
SPAN_DAYS = 480  # ~16 months
LATENT = {"base": 6.0, "user_sd": 1.9, "sub_sd": 0.7, "appeal": 0.9}  # world 0; its noise sd: World.noise_sd
GENERIC_WORDS = ("photo", "day", "nice", "my", "new", "best", "look", "great", "the", "with", "and", "at")
#: Title words that carry the text term in drawn worlds.
HOT_TITLE_WORDS = ("nice", "best", "great")


def _subcategories(n_subcategories: int | None) -> list[tuple[str, str]]:
    """(category, subcategory) pairs; with a limit, taken round-robin over categories so all 11 stay present."""
    pairs_by_cat = [[(cat, sub) for sub in subs] for cat, subs in TAXONOMY.items()]
    ordered: list[tuple[str, str]] = []
    depth = max(len(p) for p in pairs_by_cat)
    for i in range(depth):
        ordered.extend(p[i] for p in pairs_by_cat if i < len(p))
    return ordered if n_subcategories is None else ordered[: max(2, n_subcategories)]


def make_posts(
    n_train: int,
    n_test: int,
    seed: int,
    *,
    n_users: int | None = None,
    n_subcategories: int | None = None,
    user_variant: str = "A",
    world: int | World = 0,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A posts table in the ``datamodules.schema`` format (test labels NaN) plus hidden arrays.

    Returns:
        posts: one row per post, train rows then test rows (test posts are later in time).
        signal: (n,) float64 noise-free latent popularity.
        labels: (n,) float64 true labels of all posts, the test ones included (hidden from ``posts``).
        Also stored in ``posts.attrs``: ``appeal`` (n,) the per-post image appeal used to draw images, ``object``
        (n,) int the object drawn (object cue), ``world`` the ``World``.
    """
    if user_variant not in ("A", "B"):
        raise ValueError(f"user_variant must be 'A' or 'B', got {user_variant!r}")
    world = draw_world(world) if isinstance(world, (int, np.integer)) else world
    # The draws below happen in one fixed order (each step draws from ``rng`` in turn): reordering the steps
    # changes every generated data set.
    rng = np.random.default_rng(seed)
    wrng = np.random.default_rng([seed, world.index, 1])  # draws of drawn worlds only (world 0 never uses it)
    n = n_train + n_test
    pairs = _subcategories(n_subcategories)
    n_sub = len(pairs)
    n_users = n_users or max(5, n // 12)
    users = _draw_users(rng, wrng, world, n_users, n, n_train, n_sub)
    sub_eff = rng.normal(0, LATENT["sub_sd"], n_sub)
    sub_of_post = np.where(rng.random(n) < 0.5, users["sub_pref"][users["of_post"]], rng.integers(0, n_sub, n))
    appeal = rng.normal(0, 1, n)
    when = _draw_times(rng, n)
    geo = _draw_geo(rng, n)
    vocab = {c: [f"{pairs[c][1].lower().replace(',', '').replace('&', '')}{k}" for k in range(12)]
             for c in range(n_sub)}
    titles, tags, n_hot = _draw_text(rng, world, vocab, sub_of_post)
    objects = wrng.integers(0, N_OBJECTS, n) if world.image_cue == "object" else np.zeros(n, dtype=np.int64)
    tag_eff = 0.15 * n_hot - 0.1 * np.array([t == "" for t in tags])
    signal = _signal(world, wrng, users["q"][users["of_post"]], sub_eff, sub_of_post, appeal, objects, tag_eff,
                     titles, when, geo)
    labels = np.round(np.clip(signal + rng.normal(0, world.noise_sd, n), 1.0, 16.5), 2)
    profiles = _draw_profiles(rng, users["q"], n_users)
    posts = _posts_table(rng, n_train, n_test, users, profiles, pairs, vocab, sub_of_post, titles, tags, when, geo,
                         labels, user_variant)
    posts.attrs.update(appeal=appeal, object=objects, world=world)
    return posts[list(COLUMNS)], signal, labels


def _draw_users(rng: np.random.Generator, wrng: np.random.Generator, world: World, n_users: int, n: int,
                n_train: int, n_sub: int) -> dict[str, np.ndarray]:
    """Users: quality ``q`` (drives popularity), activity (heavy users post more), the user of each post
    (``of_post``), unique ``uids`` and a preferred subcategory (``sub_pref``)."""
    user_q = rng.normal(0, LATENT["user_sd"], n_users)
    activity = rng.lognormal(0, 1.0, n_users) * (1 + 0.3 * (user_q > 0))
    user_of_post = rng.choice(n_users, size=n, p=activity / activity.sum())
    if world.new_users > 0:
        user_of_post = _newcomers(user_of_post, n_train, world.new_users, activity, wrng)
    uids = np.array([f"{rng.integers(10, 99999)}@N{rng.integers(0, 99):02d}" for _ in range(n_users)])
    _, first = np.unique(uids, return_index=True)  # make uids unique
    for j in set(range(n_users)) - set(first.tolist()):
        uids[j] = f"{j + 100000}@N{j % 100:02d}"
    return {"q": user_q, "of_post": user_of_post, "uids": uids, "sub_pref": rng.integers(0, n_sub, n_users)}


def _draw_times(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Post times (chronological split: test posts after train posts): seconds since the start ``t``,
    ``postdate`` (epoch seconds), ``hour`` and ``weekday`` (Monday = 0)."""
    t = np.sort(rng.uniform(0, SPAN_DAYS * 86400, n))
    postdate = (START_EPOCH + t).astype(np.int64)
    hour = (postdate // 3600) % 24
    weekday = ((postdate // 86400) + 3) % 7  # 1970-01-01 was a Thursday (weekday 3, Monday = 0)
    return {"t": t, "postdate": postdate, "hour": hour, "weekday": weekday}


def _draw_geo(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Geotags of about a third of the posts: ``has_geo``, ``geoacc`` (0 = none), ``lat``/``lon`` (NaN = none)."""
    has_geo = rng.random(n) < 0.35
    geoacc = np.where(has_geo, rng.integers(1, 17, n), 0)
    lat = np.where(has_geo, rng.uniform(-60, 70, n).round(6), np.nan)
    lon = np.where(has_geo, rng.uniform(-170, 170, n).round(6), np.nan)
    return {"has_geo": has_geo, "geoacc": geoacc, "lat": lat, "lon": lon}


def _draw_text(rng: np.random.Generator, world: World, vocab: dict[int, list[str]],
               sub_of_post: np.ndarray) -> tuple[list[str], list[str], np.ndarray]:
    """Titles, tags (from the post's subcategory vocabulary; words ending in 0/1 are "hot") and the number of hot
    tags per post."""
    n = len(sub_of_post)
    titles, tags, n_hot = [], [], np.zeros(n)
    for i in range(n):
        words = vocab[int(sub_of_post[i])]
        k = int(rng.integers(0, 9)) if rng.random() > 0.12 else 0
        chosen = list(rng.choice(words, size=min(k, len(words)), replace=False)) if k else []
        if k and rng.random() < 0.1:
            chosen.append(f"uploaded:by=app{int(rng.integers(1, 4))}")
        n_hot[i] = sum(w[-1] in "01" for w in chosen)
        tags.append(" ".join(chosen))
        if rng.random() < world.empty_titles:
            titles.append("")
        else:
            tw = [str(rng.choice(GENERIC_WORDS))] + [str(w) for w in rng.choice(words, size=int(rng.integers(1, 3)))]
            titles.append(" ".join(tw))
    return titles, tags, n_hot


def _signal(world: World, wrng: np.random.Generator, user_q: np.ndarray, sub_eff: np.ndarray,
            sub_of_post: np.ndarray, appeal: np.ndarray, objects: np.ndarray, tag_eff: np.ndarray,
            titles: list[str], when: dict, geo: dict) -> np.ndarray:
    """(n,) noise-free latent popularity: world 0's fixed formula, or the drawn world's weighted terms and
    interactions. ``user_q``: the quality of each post's user."""
    hour, weekday, t = when["hour"], when["weekday"], when["t"]
    has_geo, geoacc = geo["has_geo"], geo["geoacc"]
    if world.original:
        return (
            LATENT["base"] + user_q + sub_eff[sub_of_post] + LATENT["appeal"] * appeal + tag_eff
            + 0.25 * np.sin(2 * np.pi * (hour - 14) / 24) + 0.15 * (weekday >= 5) + 0.4 * has_geo * geoacc / 16
        )
    terms = {
        "user": user_q,
        "category": sub_eff[sub_of_post],
        "image": _image_term(world.image_cue, appeal, objects, wrng),
        "tags": tag_eff,
        "text": np.array([sum(w in HOT_TITLE_WORDS for w in t.split()) for t in titles], dtype=np.float64),
        "time": np.sin(2 * np.pi * (hour - 14) / 24) + 0.6 * (weekday >= 5) + 0.8 * t / t.max(),
        "geo": has_geo * geoacc / 16,
    }
    peak = wrng.uniform(0, 24, len(sub_eff))
    crossed = {
        "user_x_image": standardised(terms["user"]) * standardised(terms["image"]),
        "category_x_hour": np.cos(2 * np.pi * (hour - peak[sub_of_post]) / 24),
    }
    signal = 6.4 + sum(world.strength.get(f, 0.0) * standardised(x) for f, x in terms.items())
    return signal + sum(v * standardised(crossed[k]) for k, v in world.interactions.items())


def _draw_profiles(rng: np.random.Generator, user_q: np.ndarray, n_users: int) -> dict[str, np.ndarray]:
    """Per-user profile fields (photo count, pro status, first dates, alias, description vectors); ``null`` marks
    users whose profile fields are null (at least one)."""
    photo_count = np.round(np.exp(5 + 0.6 * user_q + rng.normal(0, 0.5, n_users)))
    ispro = (rng.random(n_users) < 1 / (1 + np.exp(-(user_q - 1.0)))).astype(float)
    canbuypro = (rng.random(n_users) < 0.5).astype(float)
    firstdate = START_EPOCH - rng.uniform(30, 3000, n_users) * 86400
    firsttaken = firstdate - rng.uniform(0, 2000, n_users) * 86400
    user_null = rng.random(n_users) < 0.05
    user_null[rng.integers(n_users)] = True  # at least one user with null profile fields
    pathalias = np.array([None if rng.random() < 0.4 else f"alias{j}" for j in range(n_users)], dtype=object)
    user_vecs = rng.normal(0, 0.1, (n_users, VECTOR_COLUMNS["user_vector"])).astype(np.float32)
    user_vecs[:, 0] = user_q / 4  # a weak, real signal in the provided user vector
    loc_vecs = rng.normal(0, 0.1, (n_users, VECTOR_COLUMNS["location_vector"])).astype(np.float32)
    has_loc = rng.random(n_users) < 0.5
    return {"photo_count": photo_count, "ispro": ispro, "canbuypro": canbuypro, "firstdate": firstdate,
            "firsttaken": firsttaken, "null": user_null, "pathalias": pathalias, "user_vecs": user_vecs,
            "loc_vecs": loc_vecs, "has_loc": has_loc}


def _posts_table(rng: np.random.Generator, n_train: int, n_test: int, users: dict, profiles: dict,
                 pairs: list, vocab: dict, sub_of_post: np.ndarray, titles: list[str], tags: list[str], when: dict,
                 geo: dict, labels: np.ndarray, user_variant: str) -> pd.DataFrame:
    """The posts table of the drawn posts (post ids and concepts are the last draws); test labels NaN."""
    n = n_train + n_test
    u, uids, p = users["of_post"], users["uids"], profiles
    pids = rng.permutation(np.arange(1000, 1000 + 20 * n))[:n]
    split = np.array(["train"] * n_train + ["test"] * n_test)
    row = np.concatenate([np.arange(n_train), np.arange(n_test)])
    concepts = np.array([f"{vocab[int(c)][int(k)]}" for c, k in zip(sub_of_post, rng.integers(0, 4, n))])
    nullu = p["null"][u]
    variant_a = user_variant == "A"
    posts = pd.DataFrame({
        "post_id": pids.astype(str),
        "uid": uids[u],
        "split": split,
        "row": row.astype(np.int64),
        "image_relpath": [f"{s}/{uid}/{pid}.jpg" for s, uid, pid in zip(split, uids[u], pids)],
        "image_status": IMAGE_OK,
        "category": [pairs[c][0] for c in sub_of_post],
        "subcategory": [pairs[c][1] for c in sub_of_post],
        "concept": concepts,
        "title": titles,
        "alltags": tags,
        "mediatype": "photo",
        "postdate": when["postdate"],
        "latitude": geo["lat"],
        "longitude": geo["lon"],
        "geoaccuracy": geo["geoacc"].astype(np.int64),
        "pathalias": p["pathalias"][u],
        "ispublic": 1.0,
        "mediastatus": "ready",
        "photo_firstdate": np.where(nullu, np.nan, p["firstdate"][u]),
        "photo_firstdatetaken": np.where(nullu, np.nan, np.floor(p["firsttaken"][u])),
        "photo_count": np.where(nullu, np.nan, p["photo_count"][u]),
        "ispro": np.where(nullu, np.nan, p["ispro"][u]),
        "canbuypro": np.where(nullu, np.nan, p["canbuypro"][u]) if variant_a else np.nan,
        "timezone_offset": [None if x else "+01:00" for x in nullu],
        "timezone_id": [None if x else "Europe/Paris" for x in nullu],
        "user_vector": [p["user_vecs"][j] for j in u] if variant_a else None,
        "user_text": None if variant_a else [None if x else f"photographer number {j}" for j, x in zip(u, nullu)],
        "location_vector": [p["loc_vecs"][j] if p["has_loc"][j] else None for j in u] if variant_a else None,
        "location_text": None if variant_a else [f"City{j % 7}, Country{j % 3}" if p["has_loc"][j] else None
                                                 for j in u],
        "label": np.where(split == "train", labels, np.nan),
    })
    posts["photo_firstdate"] = np.floor(posts["photo_firstdate"])
    return posts


def _newcomers(user_of_post: np.ndarray, n_train: int, share: float, activity: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Users of posts (n,) with about ``share`` of the test posts moved to users who post nothing in training."""
    n_users = len(activity)
    pool = rng.choice(n_users, size=max(1, int(round(share * n_users))), replace=False)
    is_new = np.zeros(n_users, dtype=bool)
    is_new[pool] = True
    old = np.flatnonzero(~is_new)
    out = user_of_post.copy()
    train_new = np.flatnonzero(is_new[out[:n_train]])
    out[train_new] = rng.choice(old, size=len(train_new), p=activity[old] / activity[old].sum())
    test_rows = n_train + np.flatnonzero(rng.random(len(out) - n_train) < share)
    out[test_rows] = rng.choice(pool, size=len(test_rows))
    return out


def _image_term(cue: str, appeal: np.ndarray, objects: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n,) what the image contributes: the appeal for the pixel cues, a per-object effect, or nothing."""
    if cue == "none":
        return np.zeros_like(appeal)
    if cue == "object":
        return rng.normal(0, 1, N_OBJECTS)[objects]
    return appeal


# ----------------------------------------------------------------------------- images
PALETTE_SEED = 12345


def _class_style(n_sub: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-subcategory background/foreground colours (fixed, independent of the data seed) and shape ids."""
    rng = np.random.default_rng(PALETTE_SEED)
    colours = rng.integers(20, 236, (n_sub, 2, 3))
    shapes = np.arange(n_sub) % 3
    return colours, shapes


WARM, COOL = np.array([255.0, 110.0, 30.0]), np.array([30.0, 110.0, 255.0])


def draw_image(sub_index: int, appeal: float, rng: np.random.Generator, n_sub: int, cue: str = "appeal",
               obj: int = 0) -> Image.Image:
    """A small JPEG-able image (96-160 x 96-120 pixels): class palette + shape, and the world's image cue.

    ``cue``: ``appeal`` -> object size, brightness and saturation (world 0); ``brightness`` -> brightness only;
    ``colour`` -> the scene's hue (warm for high appeal, cool for low); ``texture`` -> contrast of fine stripes;
    ``object`` -> the shape drawn is object ``obj`` (0..4) instead of the class shape; ``none`` -> no cue.
    """
    colours, shapes = _class_style(max(n_sub, 77))
    w, h = int(rng.integers(96, 161)), int(rng.integers(96, 121))
    bg, fg = colours[sub_index]
    a = float(np.clip(appeal, -2.5, 2.5)) if cue in ("appeal", "brightness", "colour", "texture") else 0.0
    if cue == "colour":
        mix = abs(a) / 3.0
        bg, fg = (c * (1 - mix) + (WARM if a > 0 else COOL) * mix for c in (bg, fg))
    gain = 1.0 + 0.18 * a if cue in ("appeal", "brightness") else 1.0
    bg = np.clip(bg * gain, 0, 255).astype(int)
    fg = np.clip(fg * gain, 0, 255).astype(int)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    size = min(w, h) * (0.35 + 0.1 * a if cue == "appeal" else 0.35)
    cx, cy = w / 2 + rng.normal(0, w / 10), h / 2 + rng.normal(0, h / 10)
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    fill = tuple(int(v) for v in fg)
    shape = obj if cue == "object" else shapes[sub_index]
    if shape == 0:
        draw.ellipse(box, fill=fill)
    elif shape == 1:
        draw.rectangle(box, fill=fill)
    elif shape == 2:
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    elif shape == 3:  # cross
        q = size / 6
        draw.rectangle((box[0], cy - q, box[2], cy + q), fill=fill)
        draw.rectangle((cx - q, box[1], cx + q, box[3]), fill=fill)
    else:  # ring
        draw.ellipse(box, outline=fill, width=max(2, int(size / 6)))
    noise = rng.normal(0, 6, (h, w, 3))
    arr = np.asarray(img, dtype=np.float32) + noise
    if cue == "texture":
        stripes = np.where((np.arange(w) // 2) % 2 == 0, 1.0, -1.0)[None, :, None]
        arr = arr + stripes * 12.0 * (a + 2.5)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- raw layout
FILE_NAMES = {
    "2025": {"text": "text", "ts": "temporalspatial_information", "user": "user_data", "add": "additional_information"},
    "2020": {"text": "tags", "ts": "temporalspatial", "user": "userdata", "add": "additional"},
}


def _num(x: float) -> str:
    """SMPD writes numbers as strings; integers without a decimal point."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def write_smpd(
    out_dir: str | Path,
    posts: pd.DataFrame,
    signal: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    naming: str = "2025",
    image_mess: bool = True,
    write_images: bool = True,
) -> dict[str, int]:
    """Write ``posts`` in the real SMPD layout under ``out_dir`` (the layout ``datamodules.smpd`` reads); returns
    counts."""
    if naming not in FILE_NAMES:
        raise ValueError(f"naming must be one of {sorted(FILE_NAMES)}, got {naming!r}")
    names = FILE_NAMES[naming]
    out = Path(out_dir)
    rng = np.random.default_rng(seed + 7)
    appeal = posts.attrs.get("appeal", np.zeros(len(posts)))
    objects = posts.attrs.get("object", np.zeros(len(posts), dtype=np.int64))
    world: World = posts.attrs.get("world", draw_world(0))
    sub_names = [s for _, s in _subcategories(None)]
    counts = {"missing_images": 0, "truncated_images": 0}
    for split in ("train", "test"):
        mask = (posts.split == split).to_numpy()
        part = posts[mask]
        if len(part) == 0:
            continue
        meta = out / f"{split}_allmetadata_json"
        meta.mkdir(parents=True, exist_ok=True)
        (meta / f"{split}_img_filepath.txt").write_text("".join(f"{p}\n" for p in part.image_relpath))
        if split == "train":
            (meta / "train_label.txt").write_text("".join(f"{v:.2f}\n" for v in part.label))
        ids = [{"Uid": u, "Pid": p} for u, p in zip(part.uid, part.post_id)]
        cat = [{"Category": c, "Concept": k, "Pid": d["Pid"], "Uid": d["Uid"], "Subcategory": s}
               for d, c, s, k in zip(ids, part.category, part.subcategory, part.concept)]
        text = [{"Alltags": a, "Pid": d["Pid"], "Uid": d["Uid"], "Mediatype": m, "Title": t}
                for d, a, m, t in zip(ids, part.alltags, part.mediatype, part.title)]
        ts = []
        for d, pd_, la, lo, ga in zip(ids, part.postdate, part.latitude, part.longitude, part.geoaccuracy):
            missing_style = "0" if rng.random() < 0.5 else ""
            ts.append({"Postdate": str(int(pd_)), "Uid": d["Uid"], "Pid": d["Pid"],
                       "Longitude": missing_style if np.isnan(lo) else _num(lo), "Geoaccuracy": str(int(ga)),
                       "Latitude": "0" if np.isnan(la) else _num(la)})
        add = [{"Mediastatus": ms, "Pathalias": pa if pa else "None", "Ispublic": _num(ip), "Pid": d["Pid"],
                "Uid": d["Uid"]} for d, ms, pa, ip in zip(ids, part.mediastatus, part.pathalias, part.ispublic)]
        user = _user_columns(part)
        for key, rows in (("category", cat), ("text", text), ("ts", ts), ("add", add)):
            fname = names.get(key, key)
            (meta / f"{split}_{fname}.json").write_text(json.dumps(rows))
        (meta / f"{split}_{names['user']}.json").write_text(json.dumps(user))
        if write_images:
            for i, (rel, sub) in enumerate(zip(part.image_relpath, part.subcategory)):
                path = out / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                r = rng.random()
                if image_mess and r < world.missing_images:
                    counts["missing_images"] += 1
                    continue
                j = np.flatnonzero(mask)[i]
                img = draw_image(sub_names.index(sub), float(appeal[j]), rng, len(sub_names), world.image_cue,
                                 int(objects[j]))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=88)
                data = buf.getvalue()
                if image_mess and r < world.missing_images + world.truncated_images:
                    counts["truncated_images"] += 1
                    data = data[: len(data) // 3]
                path.write_bytes(data)
    sig = pd.DataFrame({"post_id": posts.post_id, "split": posts.split, "signal": signal, "label": labels})
    sig.to_parquet(out / "signal.parquet", index=False)
    (out / "world.json").write_text(json.dumps({**world.to_dict(), "description": world.describe()}, indent=1))
    return counts


def _user_columns(part: pd.DataFrame) -> dict[str, dict[str, object]]:
    """The columnar (``DataFrame.to_json()``-style) user file: ``{column: {"0": value, ...}}``, Pid an int."""
    variant_a = part.user_text.isna().all() and part.location_text.isna().all()

    def col(values) -> dict[str, object]:
        return {str(i): v for i, v in enumerate(values)}

    def f(x):
        return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)

    users: dict[str, dict[str, object]] = {
        "Uid": col(part.uid),
        "Pid": col(int(p) for p in part.post_id),
        "photo_firstdate": col(None if np.isnan(x) else str(int(x)) for x in part.photo_firstdate),
        "photo_count": col(f(x) for x in part.photo_count),
        "ispro": col(f(x) for x in part.ispro),
        "timezone_offset": col(part.timezone_offset),
    }
    if variant_a:
        users["canbuypro"] = col(f(x) for x in part.canbuypro)
        users["photo_firstdatetaken"] = col(None if np.isnan(x) else str(int(x)) for x in part.photo_firstdatetaken)
        users["timezone_timezone_id"] = col(part.timezone_id)
        users["user_description"] = col(
            "" if v is None else ",".join(f"{x:.4f}" for x in v) for v in part.user_vector)
        users["location_description"] = col(
            "" if v is None else ",".join(f"{x:.4f}" for x in v) + ",\n" for v in part.location_vector)
    else:
        users["photo_firstdatetaken"] = col(
            None if np.isnan(x) else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(x))
            for x in part.photo_firstdatetaken)
        users["timezone_id"] = col(part.timezone_id)
        users["user_description"] = col(part.user_text)
        users["location_description"] = col(part.location_text)
    return users


def generate(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    n_users: int | None = None,
    n_subcategories: int | None = None,
    user_variant: str = "A",
    naming: str = "2025",
    image_mess: bool = True,
    world: int = 0,
) -> dict[str, int]:
    """``make_posts`` + ``write_smpd``: a complete synthetic SMPD directory, deterministic per seed and world."""
    posts, signal, labels = make_posts(
        n_train, n_test, seed, n_users=n_users, n_subcategories=n_subcategories, user_variant=user_variant,
        world=world,
    )
    counts = write_smpd(out_dir, posts, signal, labels, seed=seed, naming=naming, image_mess=image_mess)
    return {"train_posts": n_train, "test_posts": n_test, **counts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a synthetic dataset in the real SMPD layout.")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-subcategories", type=int, default=None, help="default: all 77")
    p.add_argument("--user-variant", choices=["A", "B"], default="A")
    p.add_argument("--naming", choices=sorted(FILE_NAMES), default="2025")
    p.add_argument("--no-mess", action="store_true", help="no missing/truncated images")
    p.add_argument("--world", type=int, default=0, help="structure of the latent model (0 = the original)")
    a = p.parse_args(argv)
    start = time.perf_counter()
    counts = generate(a.out, a.n_train, a.n_test, a.seed, n_subcategories=a.n_subcategories,
                      user_variant=a.user_variant, naming=a.naming, image_mess=not a.no_mess, world=a.world)
    print(f"wrote {a.out} in {time.perf_counter() - start:.1f} s: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
