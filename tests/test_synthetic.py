"""The synthetic SMPD generator: determinism, label model, chronology, learnable image content."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from datamodules.synthetic import generate, make_posts
from stacking.metrics import src


def test_deterministic_per_seed(tmp_path):
    generate(tmp_path / "a", 20, 8, seed=5, n_subcategories=4)
    generate(tmp_path / "b", 20, 8, seed=5, n_subcategories=4)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix in (".json", ".txt", ".jpg"):
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    other, _, _ = make_posts(20, 8, 6, n_subcategories=4)
    same, _, _ = make_posts(20, 8, 5, n_subcategories=4)
    assert other.post_id.tolist() != same.post_id.tolist()


def test_label_model_range_moments_and_ceiling():
    posts, signal, labels = make_posts(4000, 1000, 0)
    assert labels.min() >= 1.0 and labels.max() <= 16.5
    assert np.allclose(labels, np.round(labels, 2))
    train = posts.label.notna()
    assert 5.8 < labels[train].mean() < 7.0 and 1.8 < labels[train].std() < 3.0
    assert posts.loc[~train, "label"].isna().all()  # hidden from the table
    assert src(labels, signal) > 0.85  # the signal explains most of the label; noise keeps it below 1
    assert posts.subcategory.nunique() == 77 and posts.category.nunique() == 11


def test_split_is_chronological():
    posts, _, _ = make_posts(300, 100, 1)
    assert posts.loc[posts.split == "train", "postdate"].max() <= posts.loc[posts.split == "test", "postdate"].min()


def test_image_content_carries_class_and_appeal(tmp_path):
    root = tmp_path / "raw"
    generate(root, 200, 0, seed=2, n_subcategories=4, image_mess=False)
    posts, _, _ = make_posts(200, 0, 2, n_subcategories=4)
    means = np.stack([np.asarray(Image.open(root / p), dtype=np.float32).mean((0, 1)) for p in posts.image_relpath])
    by_class = pd.DataFrame(means).groupby(posts.subcategory.to_numpy()).mean()
    gaps = [np.abs(by_class.iloc[i] - by_class.iloc[j]).max() for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 5  # class palettes differ by more than 5 grey levels in some channel
    brightness = means.mean(1)
    appeal = posts.attrs["appeal"]
    within = [src(appeal[posts.subcategory == c], brightness[posts.subcategory == c]) for c in posts.subcategory.unique()]
    assert np.mean(within) > 0.3  # appeal (which enters the label) is visible in the pixels


def test_mess_is_present(tmp_path):
    counts = generate(tmp_path / "raw", 400, 50, seed=0, n_subcategories=4)
    assert counts["missing_images"] > 0 and counts["truncated_images"] > 0
    posts, _, _ = make_posts(400, 50, 0, n_subcategories=4)
    assert (posts.title == "").any() and (posts.alltags == "").any() and posts.latitude.isna().any()
    assert posts.pathalias.isna().any() and posts.photo_count.isna().any()
