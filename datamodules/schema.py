"""The posts table: the one contract every room of popstack reads.

`datamodules.smpd.read_smpd` turns a raw SMPD directory into this table; the prepare stage writes it to
`<run>/posts.parquet`; features, shards, neural modules and the stacker all key their outputs by
``post_id``. One row per post, train rows first (file order), then test rows (file order).

Columns (dtype; meaning):

========================  ===========  =========================================================================
post_id                   str          ``str(Pid)`` (canonical, no whitespace). Unique across both splits.
uid                       str          Flickr user id, e.g. ``"12@N34"``.
split                     str          ``"train"`` or ``"test"``.
row                       int64        0-based row index inside the split's files (file order).
image_relpath             str          ``{split}/<Uid>/<Pid>.jpg`` as listed in ``*_img_filepath.txt``.
image_status              str          ``"ok"`` | ``"missing"`` (no file / empty file) | ``"unreadable"``
                                       (set by the shard writer when decoding fails) | ``"outside_root"`` (the
                                       path leaves the data root: never opened). Never fatal.
category                  str          one of 11 categories (opaque string, e.g. ``"Whether&Season"``).
subcategory               str          one of 77 subcategories (opaque string, may contain commas).
concept                   str          one of ~668 concepts.
title                     str          ``""`` when empty (never null).
alltags                   str          space-separated tags, ``""`` when empty (never null).
mediatype                 str          ``"photo"`` | ``"video"`` | ``""``.
postdate                  int64        Unix epoch seconds (UTC).
latitude, longitude       float64      decimal degrees; NaN when missing (raw ``""`` or ``"0"``).
geoaccuracy               int64        0..16, 0 = no geotag.
pathalias                 str | None   None when the raw value is ``"None"``/empty/null.
ispublic                  float64      usually 1; NaN when missing.
mediastatus               str          usually ``"ready"``; ``""`` when missing.
photo_firstdate           float64      epoch seconds; NaN when null/"None"/unparseable.
photo_firstdatetaken      float64      epoch seconds (variant B datetime strings are converted, UTC); NaN when null.
photo_count               float64      NaN when null.
ispro                     float64      NaN when null.
canbuypro                 float64      NaN when absent (variant B) or null.
timezone_offset           str | None   raw string (e.g. ``"+01:00"`` or ``"-18000"``), None when null.
timezone_id               str | None   from ``timezone_id`` or ``timezone_timezone_id``.
user_vector               list[float32] | None  the 399-float ``user_description`` (variant A); None otherwise.
user_text                 str | None   free-text ``user_description`` (variant B); None otherwise.
location_vector           list[float32] | None  the 400-float ``location_description`` (variant A); None when empty.
location_text             str | None   free-text ``location_description`` (variant B); None otherwise.
label                     float64      log-views popularity for train rows; NaN for test rows.
========================  ===========  =========================================================================

Extra columns (a source may carry the user's own per-post values after these, e.g. ``data=table``'s
``extra_numeric`` / ``extra_categorical``): ``extra_num__<name>`` (float64, NaN when missing) and
``extra_cat__<name>`` (str, ``""`` when missing). ``posts.parquet`` keeps them; the ``extra`` feature family
(``popstack.features.extra``) turns them into features.

Derived artefacts (written by the prepare stage next to ``posts.parquet``):

* ``vocab.json`` -- ``{"category": [...], "subcategory": [...], "concept": [...]}``: sorted training-split
  values; a value's id is its index; values unseen in training map to ``UNKNOWN_ID``.
* ``folds.parquet`` -- ``post_id, fold`` from ``datamodules.folds``; ``fold = -1`` for unlabelled posts.
"""

from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "test")

#: Id given to a category/subcategory/concept value not seen in the training split.
UNKNOWN_ID: int = -1

#: Fold value of posts without a label (test split, or pseudo-labelling candidates).
NO_FOLD: int = -1

KEY = "post_id"
LABEL = "label"

NULLABLE_STRING_COLUMNS: tuple[str, ...] = (
    "pathalias", "timezone_offset", "timezone_id", "user_text", "location_text",
)
INT_COLUMNS: tuple[str, ...] = ("row", "postdate", "geoaccuracy")
FLOAT_COLUMNS: tuple[str, ...] = (
    "latitude", "longitude", "ispublic", "photo_firstdate", "photo_firstdatetaken", "photo_count", "ispro",
    "canbuypro", "label",
)
VECTOR_COLUMNS: dict[str, int] = {"user_vector": 399, "location_vector": 400}

COLUMNS: tuple[str, ...] = (
    "post_id", "uid", "split", "row", "image_relpath", "image_status", "category", "subcategory", "concept",
    "title", "alltags", "mediatype", "postdate", "latitude", "longitude", "geoaccuracy", "pathalias",
    "ispublic", "mediastatus", "photo_firstdate", "photo_firstdatetaken", "photo_count", "ispro", "canbuypro",
    "timezone_offset", "timezone_id", "user_vector", "user_text", "location_vector", "location_text", "label",
)

#: Prefixes of the extra per-post columns a source may carry after ``COLUMNS`` (numbers; categories as text).
EXTRA_NUMERIC, EXTRA_CATEGORICAL = "extra_num__", "extra_cat__"


def extra_columns(columns) -> list[str]:
    """The extra columns among ``columns`` (``EXTRA_NUMERIC`` / ``EXTRA_CATEGORICAL`` prefixes), in order."""
    return [c for c in columns if c.startswith((EXTRA_NUMERIC, EXTRA_CATEGORICAL))]


IMAGE_OK, IMAGE_MISSING, IMAGE_UNREADABLE, IMAGE_OUTSIDE = "ok", "missing", "unreadable", "outside_root"


def any_image_readable(posts) -> bool:
    """Whether a dataset has images worth computing anything from: some post's ``image_status`` is ``ok`` (a table
    without the column counts as having images). The one test of "no readable image": the features stage's image
    family and the neural stage's image tower and image-only modules all follow it (on the posts of the training
    run; new posts follow the run's decision)."""
    return "image_status" not in posts or bool((posts["image_status"] == IMAGE_OK).any())


def submission_post_id(post_id: str) -> str:
    """The official submission key: ``"post" + Pid``."""
    return f"post{post_id}"
