"""Synthetic SMPD: a complete directory in the real SMPD layout with a known latent popularity model.

    python -m datamodules.synthetic OUT --n-train 2000 --n-test 800 --seed 0

Latent model (``LatentModel`` holds every coefficient; defaults in brackets). For post i of user u in subcategory c,
posted at UTC hour h on weekday d::

    signal_i = base + q_u + s_c + appeal_weight * a_i
               + hot_tag_weight * hot_i + no_tag_effect * [no tags]_i
               + hour_amplitude * cos(2 pi (h - peak_hour) / 24) + weekend_effect * [d is Sat/Sun]
               + geo_effect * [geotagged]_i * geoaccuracy_i / 16
    label_i  = round(clip(signal_i + e_i, label_min, label_max), decimals)

* ``q_u ~ N(0, user_sd^2)`` [2.0]: user quality, the dominant factor as in SMPD (HyperFusion Table 2). Users with a
  high q post more, have a larger ``photo_count`` and are more often ``ispro``; variant-A user vectors carry q/4 in
  their first component.
* ``s_c ~ N(0, subcategory_sd^2)`` [0.7]: subcategory effect. Each subcategory has its own tag/title vocabulary
  (so text carries the class), and its own colour palette and shape in the image.
* ``a_i ~ N(0, 1)``, ``appeal_weight`` [0.9]: image appeal, drawn into the picture (object size, brightness,
  saturation), so a vision model sees part of the popularity in the pixels.
* ``hot_i``: number of the subcategory's "hot" words among the post's tags, ``hot_tag_weight`` [0.15];
  ``no_tag_effect`` [-0.1].
* time: ``hour_amplitude`` [0.25] peaking at ``peak_hour`` [14], ``weekend_effect`` [0.15]; geo: ``geo_effect`` [0.4].
* ``e_i ~ N(0, noise_sd^2)`` [0.9]; ``label_min, label_max, decimals`` [1, 16.5, 2] as in SMPD (SMPD_FORMAT.md sec. 3).
* ``base`` [5.6]: with the defaults, train labels have mean about 6.4 and standard deviation about 2.5 (SMPD:
  6.41, 2.48), and the noise-free signal explains about 85% of the label variance.

``signal`` (noise-free) and the hidden test labels are written to ``signal.parquet`` so benchmarks can score the
test split and know the ceiling. The mess of real data is included: a few missing and truncated images, empty
titles and tags, no-geo posts (``"0"`` and ``""``), ``"None"`` path aliases, null user fields, junk after the
variant-A location vectors. Output is deterministic per seed (byte-identical files).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from datamodules.schema import IMAGE_OK, SPLITS, VECTOR_COLUMNS
from datamodules.smpd import LABEL_FILE, LABELLED_SPLIT, to_schema

#: The 11 SMPD categories and their 77 subcategories (SMPD_FORMAT.md section 4; commas stand for spaces).
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


@dataclass(frozen=True)
class LatentModel:
    """Coefficients of the latent popularity model; the formula and defaults are in the module docstring."""

    base: float = 5.6
    user_sd: float = 2.0
    subcategory_sd: float = 0.7
    appeal_weight: float = 0.9
    hot_tag_weight: float = 0.15
    no_tag_effect: float = -0.1
    hour_amplitude: float = 0.25
    peak_hour: float = 14.0
    weekend_effect: float = 0.15
    geo_effect: float = 0.4
    noise_sd: float = 0.9
    label_min: float = 1.0
    label_max: float = 16.5
    decimals: int = 2


START_EPOCH = 1_420_070_400  # 2015-01-01 00:00 UTC
SPAN_DAYS = 480  # about 16 months, like SMPD
MAX_GEOACCURACY = 16
GEO_FRACTION = 0.35
POSTS_PER_USER = 12  # default number of users: n / POSTS_PER_USER
USER_PREFERENCE = 0.5  # share of a user's posts in the user's favourite subcategory
VOCAB_WORDS = 12  # tag/title words per subcategory
HOT_WORDS = 2  # the first HOT_WORDS words of each vocabulary raise popularity
CONCEPTS = 4  # concepts per subcategory (the first words of its vocabulary)
MAX_TAGS = 8
NO_TAG_FRACTION = 0.12
EMPTY_TITLE_FRACTION = 0.15
MACHINE_TAG_FRACTION = 0.1
NULL_USER_FRACTION = 0.05
NO_ALIAS_USER_FRACTION = 0.4
NO_ALIAS_ROW_FRACTION = 0.1
LOCATION_FRACTION = 0.5
VECTOR_DECIMALS = 4  # description vectors are written with this many decimals (and generated already rounded)
GENERIC_WORDS = ("photo", "day", "nice", "my", "new", "best", "look", "great", "the", "with", "and", "at")
#: (UTC offset seconds, IANA name, numeric id as in variant A).
TIMEZONES = ((-28800, "America/Los_Angeles", 3), (-18000, "America/New_York", 8), (0, "Europe/London", 17),
             (3600, "Europe/Paris", 19), (28800, "Asia/Shanghai", 30), (32400, "Asia/Tokyo", 33))
USER_VARIANTS = ("A", "B")


def subcategory_pairs(n_subcategories: int | None = None) -> list[tuple[str, str]]:
    """(category, subcategory) pairs; with a limit they are taken round-robin over the categories, so the first 11
    cover all 11 categories and class sizes stay comparable."""
    by_category = [[(cat, sub) for sub in subs] for cat, subs in TAXONOMY.items()]
    ordered = [p[i] for i in range(max(map(len, by_category))) for p in by_category if i < len(p)]
    if n_subcategories is None:
        return ordered
    if not 2 <= n_subcategories <= len(ordered):
        raise ValueError(f"n_subcategories must be in 2..{len(ordered)}, got {n_subcategories}")
    return ordered[:n_subcategories]


def _slug(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def make_posts(
    n_train: int,
    n_test: int,
    seed: int,
    *,
    n_users: int | None = None,
    n_subcategories: int | None = None,
    user_variant: str = "A",
    latent: LatentModel = LatentModel(),
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A synthetic posts table in the ``datamodules.schema`` format, vectorised (200k posts in about a second).

    Args:
        n_train, n_test: posts per split; test posts are all later in time than train posts.
        seed: everything is a function of the seed.
        n_users: default ``max(5, n // POSTS_PER_USER)``.
        n_subcategories: how many of the 77 subcategories to use (all by default; see ``subcategory_pairs``).
        user_variant: ``"A"`` (399/400-float description vectors) or ``"B"`` (free-text descriptions).
        latent: the popularity model's coefficients.

    Returns:
        posts: train rows then test rows; test labels are NaN (hidden).
        signal: (n,) float64, noise-free latent popularity.
        labels: (n,) float64, the true labels of all posts, test ones included.
        ``posts.attrs["appeal"]`` holds the (n,) float64 image appeal that ``write_smpd`` draws into the images.
    """
    if user_variant not in USER_VARIANTS:
        raise ValueError(f"user_variant must be one of {USER_VARIANTS}, got {user_variant!r}")
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"need a positive number of posts, got n_train={n_train}, n_test={n_test}")
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    pairs = subcategory_pairs(n_subcategories)
    n_sub = len(pairs)
    n_users = n_users or max(5, n // POSTS_PER_USER)

    # users: quality, activity (better users post more), favourite subcategory, profile
    quality = rng.normal(0, latent.user_sd, n_users)
    activity = rng.lognormal(0, 1.0, n_users) * np.exp(0.15 * quality)
    user = rng.choice(n_users, size=n, p=activity / activity.sum())
    uid_digits = rng.choice(100 * n_users, size=n_users, replace=False) + 10
    uids = np.array([f"{d}@N{s:02d}" for d, s in zip(uid_digits, rng.integers(0, 100, n_users))])
    favourite = rng.integers(0, n_sub, n_users)
    sub = np.where(rng.random(n) < USER_PREFERENCE, favourite[user], rng.integers(0, n_sub, n))
    sub_effect = rng.normal(0, latent.subcategory_sd, n_sub)
    appeal = rng.normal(0, 1, n)

    # time: sorted, so the split is chronological
    postdate = START_EPOCH + np.sort(rng.integers(0, SPAN_DAYS * 86400, n))
    hour = (postdate // 3600) % 24
    weekday = (postdate // 86400 + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0

    geo = rng.random(n) < GEO_FRACTION
    geoaccuracy = np.where(geo, rng.integers(1, MAX_GEOACCURACY + 1, n), 0)
    latitude = np.where(geo, rng.uniform(-60, 70, n).round(6), np.nan)
    longitude = np.where(geo, rng.uniform(-170, 170, n).round(6), np.nan)

    # text: per-subcategory vocabularies; the first HOT_WORDS words of each are "hot"
    vocab = [[f"{_slug(s)}{k}" for k in range(VOCAB_WORDS)] for _, s in pairs]
    n_tags = np.where(rng.random(n) < NO_TAG_FRACTION, 0, rng.integers(1, MAX_TAGS + 1, n))
    order = np.argsort(rng.random((n, VOCAB_WORDS)), axis=1)[:, :MAX_TAGS]
    hot = ((order < HOT_WORDS) & (np.arange(MAX_TAGS) < n_tags[:, None])).sum(1)
    machine = (n_tags > 0) & (rng.random(n) < MACHINE_TAG_FRACTION)
    app = rng.integers(1, 4, n)
    tags = [" ".join([vocab[c][w] for w in o[:k]] + ([f"uploaded:by=app{a}"] if m else []))
            for c, o, k, m, a in zip(sub.tolist(), order.tolist(), n_tags.tolist(), machine.tolist(), app.tolist())]
    empty_title = rng.random(n) < EMPTY_TITLE_FRACTION
    title_words = rng.integers(0, VOCAB_WORDS, (n, 2))
    one_word = rng.random(n) < 0.5
    generic = rng.integers(0, len(GENERIC_WORDS), n)
    titles = ["" if e else " ".join([GENERIC_WORDS[g], vocab[c][w[0]]] + ([] if o else [vocab[c][w[1]]]))
              for e, g, c, w, o in zip(empty_title.tolist(), generic.tolist(), sub.tolist(), title_words.tolist(),
                                       one_word.tolist())]
    concepts = [vocab[c][k] for c, k in zip(sub.tolist(), rng.integers(0, CONCEPTS, n).tolist())]

    signal = (latent.base + quality[user] + sub_effect[sub] + latent.appeal_weight * appeal
              + latent.hot_tag_weight * hot + latent.no_tag_effect * (n_tags == 0)
              + latent.hour_amplitude * np.cos(2 * np.pi * (hour - latent.peak_hour) / 24)
              + latent.weekend_effect * (weekday >= 5)
              + latent.geo_effect * geo * geoaccuracy / MAX_GEOACCURACY)
    labels = np.round(np.clip(signal + rng.normal(0, latent.noise_sd, n), latent.label_min, latent.label_max),
                      latent.decimals)

    profile = _user_profiles(rng, quality, user_variant)
    null_user = profile.pop("null")[user]
    alias = profile.pop("alias")[user]
    alias[rng.random(n) < NO_ALIAS_ROW_FRACTION] = None  # some rows of a user lack the alias (as in SMPD)
    pids = (rng.choice(20 * n, size=n, replace=False) + 775).astype(str)
    split = [SPLITS[0]] * n_train + [SPLITS[1]] * n_test
    posts = to_schema({
        "post_id": pids,
        "uid": uids[user],
        "split": split,
        "row": np.concatenate([np.arange(n_train), np.arange(n_test)]),
        "image_relpath": [f"{s}/{u}/{p}.jpg" for s, u, p in zip(split, uids[user], pids)],
        "image_status": [IMAGE_OK] * n,
        "category": [pairs[c][0] for c in sub],
        "subcategory": [pairs[c][1] for c in sub],
        "concept": concepts,
        "title": titles,
        "alltags": tags,
        "mediatype": ["photo"] * n,
        "postdate": postdate,
        "latitude": latitude,
        "longitude": longitude,
        "geoaccuracy": geoaccuracy,
        "pathalias": alias,
        "ispublic": np.ones(n),
        "mediastatus": ["ready"] * n,
        **{col: values[user] if col in VECTOR_COLUMNS else _per_post(values, user, null_user)
           for col, values in profile.items()},
        "label": np.where(np.arange(n) < n_train, labels, np.nan),
    })
    posts.attrs["appeal"] = appeal
    return posts, signal, labels


def _user_profiles(rng: np.random.Generator, quality: np.ndarray, user_variant: str) -> dict[str, np.ndarray]:
    """Per-user profile columns (schema names), plus ``null`` (users whose profile fields are null) and ``alias``.

    Variant A: description vectors (all zeros for null users, as SMPD gives unknown users), numeric timezone
    strings; variant B: free texts, ``+HH:MM`` offsets and IANA zone names."""
    m = len(quality)
    null = rng.random(m) < NULL_USER_FRACTION
    null[rng.integers(m)] = True  # at least one
    firstdate = START_EPOCH - rng.integers(30, 3000, m) * 86400
    zone = rng.integers(0, len(TIMEZONES), m)
    offsets = np.array([TIMEZONES[z][0] for z in zone])
    has_location = (rng.random(m) < LOCATION_FRACTION) & ~null
    profile: dict[str, np.ndarray] = {
        "null": null,
        "alias": np.array([None if x else f"alias{j}" for j, x in enumerate(rng.random(m) < NO_ALIAS_USER_FRACTION)],
                          dtype=object),
        "photo_firstdate": firstdate.astype(float),
        "photo_firstdatetaken": (firstdate - rng.integers(0, 2000, m) * 86400).astype(float),
        "photo_count": np.round(np.exp(5 + 0.6 * quality + rng.normal(0, 0.5, m))),
        "ispro": (rng.random(m) < 1 / (1 + np.exp(-(quality - 1.0)))).astype(float),
        "canbuypro": (rng.random(m) < 0.5).astype(float) if user_variant == "A" else np.full(m, np.nan),
    }
    none = np.full(m, None, dtype=object)
    if user_variant == "A":
        user_vec = rng.normal(0, 0.1, (m, VECTOR_COLUMNS["user_vector"]))
        user_vec[:, 0] = quality / 4  # a weak, real signal in the provided user vector
        user_vec[null] = 0.0
        loc_vec = rng.normal(0, 0.1, (m, VECTOR_COLUMNS["location_vector"]))
        user_vec, loc_vec = (np.round(v, VECTOR_DECIMALS).astype(np.float32) for v in (user_vec, loc_vec))
        vectors = np.empty(m, dtype=object)
        vectors[:] = list(user_vec)
        locations = np.empty(m, dtype=object)
        locations[:] = [v if h else None for v, h in zip(loc_vec, has_location)]
        profile.update({
            "timezone_offset": np.array([str(o) for o in offsets], dtype=object),
            "timezone_id": np.array([str(TIMEZONES[z][2]) for z in zone], dtype=object),
            "user_vector": vectors, "user_text": none, "location_vector": locations, "location_text": none,
        })
    else:
        profile.update({
            "timezone_offset": np.array([f"{'-' if o < 0 else '+'}{abs(o) // 3600:02d}:00" for o in offsets],
                                        dtype=object),
            "timezone_id": np.array([TIMEZONES[z][1] for z in zone], dtype=object),
            "user_vector": none,
            "user_text": np.array([f"<p>Photographer #{j}, camera, travel &amp; life.</p>" for j in range(m)],
                                  dtype=object),
            "location_vector": none,
            "location_text": np.array([f"City{j % 7}, Region{j % 5}, Country{j % 3}" if h else None
                                       for j, h in enumerate(has_location)], dtype=object),
        })
    return profile


def _per_post(values: np.ndarray, user: np.ndarray, null_user: np.ndarray) -> np.ndarray:
    """A per-user column spread to posts; missing (None / NaN) for users whose profile is null."""
    out = values[user]
    if out.dtype == object:
        out[null_user] = None
        return out
    return np.where(null_user, np.nan, out)


# ----------------------------------------------------------------------------- images
PALETTE_SEED = 12345  # class colours are fixed, independent of the data seed
IMAGE_WIDTHS = (96, 160)
IMAGE_HEIGHTS = (96, 120)
JPEG_QUALITY = 88
PIXEL_NOISE = 8  # +- grey levels of uniform pixel noise
SHAPES = ("ellipse", "rectangle", "triangle", "stripes")


def _class_styles() -> tuple[np.ndarray, list[str]]:
    """(77, 2, 3) background/foreground colours and a shape per subcategory, in ``subcategory_pairs()`` order."""
    rng = np.random.default_rng(PALETTE_SEED)
    n = len(subcategory_pairs())
    return rng.integers(30, 226, (n, 2, 3)), [SHAPES[i % len(SHAPES)] for i in range(n)]


def draw_image(colours: np.ndarray, shape: str, appeal: float, rng: np.random.Generator) -> Image.Image:
    """One small picture: the class's colours (2, 3) and shape; appeal scales brightness, saturation and size.

    Size is random in ``IMAGE_WIDTHS`` x ``IMAGE_HEIGHTS`` pixels.
    """
    w = int(rng.integers(IMAGE_WIDTHS[0], IMAGE_WIDTHS[1] + 1))
    h = int(rng.integers(IMAGE_HEIGHTS[0], IMAGE_HEIGHTS[1] + 1))
    a = float(np.clip(appeal, -2.5, 2.5))
    grey = colours.mean(1, keepdims=True)
    vivid = grey + (colours - grey) * (1 + 0.25 * a)  # saturation
    bg, fg = (tuple(int(v) for v in np.clip(c * (1 + 0.15 * a), 0, 255)) for c in vivid)  # brightness
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    size = min(w, h) * (0.45 + 0.1 * a)
    cx, cy = w / 2 + rng.normal(0, w / 12), h / 2 + rng.normal(0, h / 12)
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    if shape == "ellipse":
        draw.ellipse(box, fill=fg)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fg)
    else:
        step = max(4, int(size / 5))
        for x in range(int(box[0]), int(box[2]), 2 * step):
            draw.rectangle((x, box[1], x + step, box[3]), fill=fg)
    noise = rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- raw layout
#: File name suffix (after ``{split}_``) of each logical file (``datamodules.smpd.FILE_ALIASES`` keys), per naming.
FILE_NAMES: dict[str, dict[str, str]] = {
    "2025": {"img_filepath": "img_filepath.txt", "category": "category.json", "text": "text.json",
             "temporalspatial": "temporalspatial_information.json", "user": "user_data.json",
             "additional": "additional_information.json"},
    "2020": {"img_filepath": "img_filepath.txt", "category": "category.json", "text": "tags.json",
             "temporalspatial": "temporalspatial.json", "user": "userdata.json", "additional": "additional.json"},
}
MISSING_IMAGE_FRACTION = 0.01
TRUNCATED_IMAGE_FRACTION = 0.01


def metadata_dir(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}_allmetadata_json"


def metadata_path(out_dir: str | Path, split: str, logical: str, naming: str = "2025") -> Path:
    """Path of a logical file (``FILE_NAMES`` key, or ``"label"``) of ``split`` in a directory ``write_smpd`` wrote."""
    if logical == "label":
        return metadata_dir(out_dir, split) / LABEL_FILE
    return metadata_dir(out_dir, split) / f"{split}_{FILE_NAMES[naming][logical]}"


def _num(x: float) -> str:
    """Numbers as SMPD writes them in list files: strings, integers without a decimal point."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _json_value(x: object) -> object:
    """A user-file cell: None for missing, floats as JSON floats (``1813.0``), strings as they are."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return None
    return float(x) if isinstance(x, (float, np.floating)) else x


def write_smpd(
    out_dir: str | Path,
    posts: pd.DataFrame,
    signal: np.ndarray,
    labels: np.ndarray,
    *,
    naming: str = "2025",
    user_variant: str = "A",
    seed: int = 0,
    image_mess: bool = True,
) -> dict[str, int]:
    """Write ``posts`` (from ``make_posts``) in the real SMPD layout under ``out_dir``; returns counts.

    Per split: ``{split}_allmetadata_json/`` with ``{split}_img_filepath.txt``, ``train_label.txt`` (train only) and
    the five JSON files (``naming`` picks the 2019-2025 or the 2020 names): list files of records with string values
    and shuffled key order, the user file columnar with an int Pid; images at ``{split}/<Uid>/<Pid>.jpg``. Also
    ``signal.parquet`` (post_id, split, signal, label incl. the hidden test labels) at the top, which is not part of
    SMPD. ``image_mess``: about 1% of the images missing and 1% truncated.
    """
    if naming not in FILE_NAMES:
        raise ValueError(f"naming must be one of {sorted(FILE_NAMES)}, got {naming!r}")
    has_text = posts.user_text.notna().any() or posts.location_text.notna().any()
    if user_variant not in USER_VARIANTS or has_text != (user_variant == "B"):
        raise ValueError(f"user_variant {user_variant!r} does not match the posts (made with variant "
                         f"{'B' if has_text else 'A'})")
    appeal = posts.attrs.get("appeal")
    if appeal is None or len(appeal) != len(posts):
        raise ValueError("posts.attrs['appeal'] is missing or has the wrong length: pass the table make_posts returned")
    out = Path(out_dir)
    rng = np.random.default_rng([seed, 1])
    colours, shapes = _class_styles()
    style = {sub: i for i, (_, sub) in enumerate(subcategory_pairs())}
    counts = {"missing_images": 0, "truncated_images": 0}
    for split in SPLITS:
        index = np.flatnonzero((posts.split == split).to_numpy())
        if len(index) == 0:
            continue
        part = posts.iloc[index]
        metadata_dir(out, split).mkdir(parents=True, exist_ok=True)
        path = {k: metadata_path(out, split, k, naming) for k in FILE_NAMES[naming]}
        path["img_filepath"].write_text("".join(f"{p}\n" for p in part.image_relpath))
        if split == LABELLED_SPLIT:
            metadata_path(out, split, "label").write_text("".join(f"{v:.2f}\n" for v in part.label))
        for key, rows in _list_files(part, rng).items():
            path[key].write_text(json.dumps(rows))
        path["user"].write_text(json.dumps(_user_columns(part, user_variant)))
        for i, rel, sub in zip(index, part.image_relpath, part.subcategory):
            r = rng.random()
            if image_mess and r < MISSING_IMAGE_FRACTION:
                counts["missing_images"] += 1
                continue
            k = style[sub]
            buf = io.BytesIO()
            draw_image(colours[k], shapes[k], float(appeal[i]), rng).save(buf, format="JPEG", quality=JPEG_QUALITY)
            data = buf.getvalue()
            if image_mess and r < MISSING_IMAGE_FRACTION + TRUNCATED_IMAGE_FRACTION:
                counts["truncated_images"] += 1
                data = data[: len(data) // 3]
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
    pd.DataFrame({"post_id": posts.post_id, "split": posts.split, "signal": signal, "label": labels}).to_parquet(
        out / "signal.parquet", index=False)
    return counts


def _list_files(part: pd.DataFrame, rng: np.random.Generator) -> dict[str, list[dict[str, str]]]:
    """The four list-of-records files, string values and the key orders seen in the real files."""
    ids = list(zip(part.uid, part.post_id))
    no_geo_style = np.where(rng.random(len(part)) < 0.5, "0", "")  # real files write both
    return {
        "category": [{"Category": c, "Concept": k, "Pid": p, "Uid": u, "Subcategory": s}
                     for (u, p), c, s, k in zip(ids, part.category, part.subcategory, part.concept)],
        "text": [{"Alltags": a, "Pid": p, "Uid": u, "Mediatype": m, "Title": t}
                 for (u, p), a, m, t in zip(ids, part.alltags, part.mediatype, part.title)],
        "temporalspatial": [
            {"Postdate": str(d), "Uid": u, "Pid": p, "Longitude": style if np.isnan(lo) else _num(lo),
             "Geoaccuracy": str(g), "Latitude": "0" if np.isnan(la) else _num(la)}
            for (u, p), d, la, lo, g, style in zip(ids, part.postdate, part.latitude, part.longitude,
                                                   part.geoaccuracy, no_geo_style)],
        "additional": [{"Mediastatus": ms, "Pathalias": "None" if pd.isna(pa) else pa, "Ispublic": _num(ip),
                        "Pid": p, "Uid": u}
                       for (u, p), ms, pa, ip in zip(ids, part.mediastatus, part.pathalias, part.ispublic)],
    }


def _user_columns(part: pd.DataFrame, user_variant: str) -> dict[str, dict[str, object]]:
    """The columnar (``DataFrame.to_json()``) user file ``{column: {"0": value, ...}}``: Pid an int, numbers as JSON
    floats, nulls; variant A has ``canbuypro``, ``timezone_timezone_id``, epoch strings and the vectors as
    comma strings (location vectors with trailing junk); variant B has ``timezone_id``, datetime strings and texts."""
    def col(values) -> dict[str, object]:
        return {str(i): _json_value(v) for i, v in enumerate(values)}

    def epoch_text(x: float) -> str | None:
        return None if np.isnan(x) else str(int(x))

    def date_text(x: float) -> str | None:
        return None if np.isnan(x) else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(x))

    cache: dict[int, str] = {}

    def vector_text(v: np.ndarray | None, junk: str = "") -> str:
        if v is None:
            return ""
        if id(v) not in cache:  # posts of one user share the array
            cache[id(v)] = ",".join(f"{x:.{VECTOR_DECIMALS}f}" for x in v.tolist())
        return cache[id(v)] + junk

    users: dict[str, dict[str, object]] = {
        "Uid": col(part.uid),
        "Pid": {str(i): int(p) for i, p in enumerate(part.post_id)},
        "photo_firstdate": col(epoch_text(x) for x in part.photo_firstdate),
        "photo_count": col(part.photo_count),
        "ispro": col(part.ispro),
        "timezone_offset": col(None if pd.isna(x) else x for x in part.timezone_offset),
    }
    if user_variant == "A":
        users["canbuypro"] = col(part.canbuypro)
        users["photo_firstdatetaken"] = col(epoch_text(x) for x in part.photo_firstdatetaken)
        users["timezone_timezone_id"] = col(None if pd.isna(x) else x for x in part.timezone_id)
        users["user_description"] = col(vector_text(v) for v in part.user_vector)
        users["location_description"] = col(vector_text(v, ",\r\n") for v in part.location_vector)
    else:
        users["photo_firstdatetaken"] = col(date_text(x) for x in part.photo_firstdatetaken)
        users["timezone_id"] = col(None if pd.isna(x) else x for x in part.timezone_id)
        users["user_description"] = col(None if pd.isna(x) else x for x in part.user_text)
        users["location_description"] = col(None if pd.isna(x) else x for x in part.location_text)
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
) -> dict[str, int]:
    """``make_posts`` + ``write_smpd``: a complete synthetic SMPD directory, deterministic per seed; returns counts."""
    posts, signal, labels = make_posts(n_train, n_test, seed, n_users=n_users, n_subcategories=n_subcategories,
                                       user_variant=user_variant)
    counts = write_smpd(out_dir, posts, signal, labels, naming=naming, user_variant=user_variant, seed=seed,
                        image_mess=image_mess)
    return {"train_posts": n_train, "test_posts": n_test, "users": int(posts.uid.nunique()), **counts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datamodules.synthetic",
                                description="Write a synthetic dataset in the real SMPD layout (see the module doc).")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--n-train", type=int, default=2000, help="train posts (default 2000)")
    p.add_argument("--n-test", type=int, default=800, help="test posts (default 800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-users", type=int, default=None, help=f"default: posts / {POSTS_PER_USER}")
    p.add_argument("--n-subcategories", type=int, default=None, help="default: all 77")
    p.add_argument("--user-variant", choices=USER_VARIANTS, default="A",
                   help="A: 399/400-float description vectors; B: free-text descriptions")
    p.add_argument("--naming", choices=sorted(FILE_NAMES), default="2025", help="file-name set")
    p.add_argument("--no-mess", action="store_true", help="no missing or truncated images")
    a = p.parse_args(argv)
    start = time.perf_counter()
    counts = generate(a.out, a.n_train, a.n_test, a.seed, n_users=a.n_users, n_subcategories=a.n_subcategories,
                      user_variant=a.user_variant, naming=a.naming, image_mess=not a.no_mess)
    written = sorted(str(q.relative_to(a.out)) for q in a.out.glob("*_allmetadata_json/*")) + ["signal.parquet"]
    print(f"wrote {a.out} in {time.perf_counter() - start:.1f} s: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print("files: " + ", ".join(written) + ", images under " + ", ".join(f"{s}/" for s in SPLITS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
