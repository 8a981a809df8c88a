"""The typed config of the Hydra group ``data/``: the keys every source shares, and one section per registered
source (``data.<kind>``, from the source's ``Config``; made from the registry, so a new source file extends it).

Defaults here are those of real data (``configs/data/smpd.yaml`` changes only ``kind`` and ``root``); each
``configs/data/<kind>.yaml`` holds only what differs (``defaults: [schema, _self_]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from popstack.datamodules.sources import sources
from popstack.datamodules.typed import setting

#: Hydra's / OmegaConf's "must be given" value.
MISSING = "???"


def _date_window_error(value: Any) -> str | None:
    from popstack.datamodules.smpd import postdate_window

    try:
        postdate_window(list(value) if isinstance(value, (list, tuple)) else value)
    except (ValueError, TypeError):
        return 'two ISO dates [first, end] with first < end, e.g. ["2004-01-01", "2100-01-01"]'
    return None


def _workers_error(value: Any) -> str | None:
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    return None if ok else "auto or an integer >= 0"


@dataclass
class CommonDataConfig:
    """kind: the data source (``datamodules.sources``; a file per kind). root: where its data is (a directory; the
    synthetic source generates it; the table source's file folder).
    check_images: stat every image file while reading (missing -> counted, never fatal).
    postdate_range: plausible post dates [first, end) UTC; a post outside is an error naming file, row and field.
    SMPD's window (Flickr opened in 2004); widen it (e.g. [1990-01-01, 2100-01-01]) for an archive of older posts.
    text_field: the post text the CLIP text tower reads: title | alltags | title+alltags.
    shard_size: posts per WebDataset shard.
    image_short_side: re-encode images into the shards so the shorter side is this (the model's input size: 224 for
    vit_b32/vit_l14; loaders then decode small JPEGs); null: see image_max_side.
    image_max_side: re-encode images whose longer side exceeds this (when image_short_side is null); null keeps the
    original bytes. image_quality: JPEG quality of re-encoded images.
    num_workers: loader workers per rank: auto = the rank's cores - 1 (cores / ranks per node, or SLURM's
    --cpus-per-task), or a number.
    """

    kind: str = setting(MISSING, choices=tuple(sources()))
    root: str = setting(MISSING)
    check_images: bool = setting(True)
    postdate_range: Any = setting(["2004-01-01", "2100-01-01"], check=_date_window_error)
    text_field: str = setting("title+alltags", choices=("title", "alltags", "title+alltags"))
    shard_size: int = setting(5000, lo=1)
    image_max_side: int | None = setting(512, lo=1)
    image_short_side: int | None = setting(224, lo=1)
    image_quality: int = setting(90, lo=1, hi=100)
    num_workers: Any = setting("auto", check=_workers_error)


#: The ``data`` group's schema: the common keys, then ``data.<kind>`` of every registered source.
DataConfig = dataclasses.make_dataclass(
    "DataConfig", [(kind, source.Config, field(default_factory=source.Config)) for kind, source in sources().items()],
    bases=(CommonDataConfig,))
DataConfig.__module__ = __name__
DataConfig.__doc__ = CommonDataConfig.__doc__
