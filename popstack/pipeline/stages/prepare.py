"""Stage 1, prepare: the posts of the run's data source (``datamodules.sources``, by ``data.kind``) -> posts table,
vocab, folds, shards."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from popstack.datamodules.atomic import atomic_path, atomic_write_json
from popstack.datamodules.folds import write_folds
from popstack.datamodules.schema import IMAGE_OK, KEY, LABEL
from popstack.pipeline.checks import check_free_space, check_labelled
from popstack.pipeline.errors import UserError
from popstack.pipeline.layout import RunLayout
from popstack.pipeline.manifest import StageResult, raw_fingerprint
from popstack.pipeline.stages.base import StageContext, common_config, data_config

log = logging.getLogger("popstack")


def source(cfg: DictConfig):
    """The registered data source of ``data.kind`` (``datamodules.sources``)."""
    from popstack.datamodules.sources import get_source

    return get_source(str(cfg.data.kind))


def raw_root(cfg: DictConfig) -> Path:
    """Where this run's posts are (``data.root``; the synthetic source generates its folder on first use)."""
    return source(cfg).locate(cfg.data)


def config(c: dict) -> dict:
    return {"data": data_config(c), **common_config(c)}


def outside_inputs(cfg: DictConfig) -> dict:
    """The fingerprint of what the source reads (``DataSource.inputs``: metadata files' content, images' sizes
    and times; a whole data root, or the files the source names); a run directory inside it is not part of it."""
    folder, files = source(cfg).inputs(cfg.data, raw_root(cfg))
    if files is None:
        return raw_fingerprint(folder, exclude=(Path(cfg.run_dir),))
    return files_fingerprint(folder, files)


def run(ctx: StageContext) -> StageResult:
    from popstack.datamodules.shards import build_vocab
    from popstack.datamodules.smpd import write_posts

    cfg, layout = ctx.cfg, ctx.layout
    where = raw_root(cfg)
    posts = source(cfg).read(cfg.data, where)
    root = source(cfg).image_root(where)
    repairs = {f"repaired_{col}": n for col, n in posts.attrs["repairs"].items() if n}
    train = posts[posts.split == "train"]
    if len(train) == 0 or train[LABEL].notna().sum() == 0:
        raise UserError(f"{where}: the train split has no labelled posts")
    if (posts.split == "test").sum() == 0:
        log.warning("%s: no test split; the submission will be empty", where)

    folds = check_labelled(posts, cfg)  # checked before the first write (pipeline/checks.py)
    layout.root.mkdir(parents=True, exist_ok=True)
    check_free_space(layout.root, sum(size for size, _ in (ctx.inputs or {}).values()), len(posts), cfg)
    vocab = build_vocab(train)
    atomic_write_json(layout.vocab, vocab)
    write_folds(folds, layout.folds)
    with atomic_path(layout.shards) as tmp:
        posts = write_split_shards(posts, root, tmp, vocab, cfg)
    write_posts(posts, layout.posts)

    counts = {**_data_counts(posts), "repaired_values": sum(repairs.values()), **repairs}
    log.info("prepare: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return StageResult(
        outputs=[RunLayout.posts, RunLayout.vocab, RunLayout.folds, RunLayout.shards], counts=counts,
    )


def image_options(cfg: DictConfig) -> dict:
    """How the shards store images (``data.image_short_side``, ``data.image_quality``)."""
    return {"image_short_side": cfg.data.image_short_side, "image_quality": int(cfg.data.image_quality)}


def write_split_shards(posts: pd.DataFrame, root: Path, shard_dir: Path, vocab: dict, cfg: DictConfig) -> pd.DataFrame:
    """Shards of every split present; returns ``posts`` with the image status the shard writer found."""
    from popstack.datamodules.shards import write_shards

    statuses: dict[str, str] = {}
    for split in ("train", "test"):
        part = posts[posts.split == split]
        if len(part):
            info = write_shards(part, root, shard_dir, split=split, class_ids=vocab,
                                shard_size=int(cfg.data.shard_size), image_max_side=cfg.data.image_max_side,
                                **image_options(cfg),
                                progress=bool(cfg.progress_bar))
            statuses.update(info.image_status)
    return posts.assign(image_status=posts[KEY].map(statuses).fillna(posts["image_status"]))


def prepare_new_posts(cfg: DictConfig, run: RunLayout, raw: Path, work: RunLayout) -> pd.DataFrame:
    """Lay out new (unlabelled) posts ``raw`` (in the form of the run's source: ``DataSource.new_posts``) in
    ``work`` the way the training run is laid out, with the run's vocab."""
    posts = source(cfg).read(cfg.data, raw, labels=False)
    if len(posts) == 0:
        raise UserError(f"{raw}: no posts to predict (the image lists are empty)")
    return lay_out_new_posts(cfg, run, posts, source(cfg).image_root(raw), work)


def lay_out_new_posts(cfg: DictConfig, run: RunLayout, posts: pd.DataFrame, raw_dir: Path,
                      work: RunLayout) -> pd.DataFrame:
    """Shards, posts table, vocab and (empty) folds of ``posts`` in ``work``; images at ``raw_dir / image_relpath``."""
    from popstack.datamodules.schema import NO_FOLD
    from popstack.datamodules.smpd import write_posts

    vocab = json.loads(run.vocab.read_text())
    work.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work.vocab, vocab)
    posts = write_split_shards(posts, raw_dir, work.shards, vocab, cfg)
    write_posts(posts, work.posts)
    write_folds(pd.DataFrame({KEY: posts[KEY].to_numpy(), "fold": NO_FOLD}), work.folds)
    return posts


def files_fingerprint(folder: Path, files: tuple[str, ...]) -> dict:
    """``{relative name: [size, sha256]}`` of each named file below ``folder`` (images: ``[size, mtime_ns]``, as
    ``raw_fingerprint``); a name leaving the folder or naming no file is ``[-1, "missing"]`` (never opened)."""
    from popstack.datamodules.confine import ConfinedRoot
    from popstack.pipeline.manifest import IMAGE_SUFFIXES, file_digest

    confined, out = ConfinedRoot(folder), {}
    for name in sorted(set(files)):
        real = confined.resolve(name)
        try:
            st = real.stat() if real is not None else None
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            out[name] = [-1, "missing"]
        else:
            second = st.st_mtime_ns if real.suffix.lower() in IMAGE_SUFFIXES else file_digest(real, st.st_size)
            out[name] = [st.st_size, second]
    return out


def _data_counts(posts: pd.DataFrame) -> dict[str, int]:
    """What the prepare stage saw: sizes and the normal real-world mess, counted (never fatal)."""
    by_split = posts.groupby("split")
    return {
        "posts": len(posts),
        **{f"{s}_posts": int(n) for s, n in by_split.size().items()},
        "users": int(posts.uid.nunique()),
        "subcategories_in_train": int(posts.loc[posts.split == "train", "subcategory"].nunique()),
        "images_not_ok": int((posts.image_status != IMAGE_OK).sum()),
        **{f"images_{s}": int(n) for s, n in posts.image_status.value_counts().items() if s != IMAGE_OK},
        "empty_titles": int((posts.title == "").sum()),
        "empty_tags": int((posts.alltags == "").sum()),
        "no_geo": int(posts.latitude.isna().sum()),
    }
