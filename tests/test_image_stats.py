"""The image-statistics feature family: pixel statistics that follow the image, shard reading, missing images."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import webdataset as wds
from PIL import Image

from popstack.features.build import build_features
from popstack.features.config import FeatureConfig
from popstack.features.families import IMAGE_STATS, column_name
from popstack.features.image_stats import HUE_BINS, image_statistics, image_stats_features, shard_image_statistics


def _jpeg(rgb: tuple[int, int, int], size=(80, 60), stripes: bool = False) -> bytes:
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(rgb, np.uint8)
    if stripes:
        arr[:, ::2] = 255 - arr[:, ::2]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_statistics_follow_the_pixels():
    red, grey, dark = image_statistics(_jpeg((220, 30, 30))), image_statistics(_jpeg((128, 128, 128))), \
        image_statistics(_jpeg((20, 20, 20)))
    assert red["red"] > 0.8 and red["green"] < 0.2 and red["saturation"] > 0.7
    assert red["colourfulness"] > 50 and grey["colourfulness"] < 5 and grey["saturation"] < 0.05
    assert red["hue_0"] > 0.9 and abs(sum(red[f"hue_{k}"] for k in range(HUE_BINS)) - 1) < 1e-6
    assert dark["brightness"] < 0.1 < grey["brightness"]
    striped = image_statistics(_jpeg((60, 60, 60), stripes=True))
    assert striped["sharpness"] > grey["sharpness"] + 3 and striped["contrast"] > grey["contrast"]
    assert (red["width"], red["height"], red["aspect"]) == (80.0, 60.0, 80 / 60)
    assert image_statistics(b"not a jpeg") is None


def test_family_reads_shards_and_marks_missing_images(tmp_path):
    with wds.ShardWriter(str(tmp_path / "train-%06d.tar"), maxcount=2, verbose=0) as sink:
        sink.write({"__key__": "11", "jpg": _jpeg((200, 40, 40)), "json": b"{}"})
        sink.write({"__key__": "12", "json": b"{}"})  # a post without an image
        sink.write({"__key__": "13", "jpg": b"truncated", "json": b"{}"})
    stats = shard_image_statistics(tmp_path)
    assert sorted(stats) == ["11", "13"] and stats["13"] is None  # no image: absent; undecodable: None
    posts = pd.DataFrame({"post_id": ["12", "11", "13"]})
    frame = image_stats_features(posts, stats)
    has = frame[column_name(IMAGE_STATS, "has_image")].tolist()
    assert has == [0.0, 1.0, 0.0] and frame.dtypes.eq(np.float32).all()
    assert frame.iloc[1][column_name(IMAGE_STATS, "red")] > 0.7
    assert frame.drop(columns=column_name(IMAGE_STATS, "has_image")).iloc[[0, 2]].isna().all().all()


def test_family_joins_the_feature_matrix(tmp_path):
    from popstack.datamodules.synthetic import make_posts

    posts, _, _ = make_posts(30, 10, 0, n_subcategories=3)
    with wds.ShardWriter(str(tmp_path / "train-%06d.tar"), maxcount=100, verbose=0) as sink:
        for pid in posts.post_id[:5]:
            sink.write({"__key__": pid, "jpg": _jpeg((10, 200, 10))})
    cfg = FeatureConfig(sentence_model="", user_vector_dim=2, location_vector_dim=2, user_tag_svd_dim=0, tfidf_dim=0)
    folds = np.where(posts.split == "train", np.arange(len(posts)) % 2, -1)
    fs = build_features(posts, folds, cfg, image_dir=tmp_path)
    col = column_name(IMAGE_STATS, "green")
    assert fs.families[col] == IMAGE_STATS and fs.frame[col].notna().sum() == 5
    off = build_features(posts, folds, FeatureConfig(**{**cfg.__dict__, "image_stats": False}))
    assert not any(c.startswith(IMAGE_STATS) for c in off.families)


def test_statistics_over_worker_processes_equal_one_process(tmp_path):
    """Decoding spread over processes (each reading its images from the tar files) gives the same numbers."""
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(tmp_path / "train-%06d.tar"), maxcount=300, verbose=0) as sink:
        for i in range(600):
            sink.write({"__key__": f"p{i}", "jpg": _jpeg(tuple(int(v) for v in rng.integers(0, 255, 3)),
                                                        stripes=bool(i % 3))})
    one = shard_image_statistics(tmp_path, workers=1)
    two = shard_image_statistics(tmp_path, workers=2)
    assert len(one) == 600 and one == two
    assert one["p5"] == image_statistics(_jpeg(tuple(int(v) for v in np.random.default_rng(0).integers(
        0, 255, (6, 3))[5]), stripes=True))
