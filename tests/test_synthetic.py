"""The synthetic SMPD generator: determinism, label model, chronology, learnable image content."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from PIL import Image

from popstack.datamodules.synthetic import HOT_TITLE_WORDS, generate, make_posts
from popstack.datamodules.synthetic_worlds import draw_world
from popstack.stacking.metrics import src


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
    within = [src(appeal[posts.subcategory == c], brightness[posts.subcategory == c])
              for c in posts.subcategory.unique()]
    assert np.mean(within) > 0.3  # appeal (which enters the label) is visible in the pixels


def test_mess_is_present(tmp_path):
    counts = generate(tmp_path / "raw", 400, 50, seed=0, n_subcategories=4)
    assert counts["missing_images"] > 0 and counts["truncated_images"] > 0
    posts, _, _ = make_posts(400, 50, 0, n_subcategories=4)
    assert (posts.title == "").any() and (posts.alltags == "").any() and posts.latitude.isna().any()
    assert posts.pathalias.isna().any() and posts.photo_count.isna().any()


def _digest(posts: pd.DataFrame, *arrays: np.ndarray) -> str:
    h = hashlib.sha256(posts.drop(columns=["user_vector", "location_vector"]).to_csv().encode())
    for v in posts.user_vector:
        h.update(np.asarray(v).tobytes())
    for a in arrays:
        h.update(np.asarray(a).tobytes())
    return h.hexdigest()[:16]


def test_world_zero_reproduces_the_original_data(tmp_path):
    """World 0 is the original latent model, bit for bit: the demo's data and numbers do not move (digests taken
    from the generator before worlds existed)."""
    posts, signal, labels = make_posts(60, 20, 0, n_subcategories=20, world=0)
    assert _digest(posts, signal, labels) == "cb52c6df5ad5ea74"
    generate(tmp_path, 60, 20, seed=0, n_subcategories=20, world=0)
    h = hashlib.sha256()
    for p in sorted(tmp_path.rglob("*")):
        if p.is_file() and p.suffix != ".parquet" and p.name != "world.json":
            h.update(str(p.relative_to(tmp_path)).encode())
            h.update(p.read_bytes())
    assert h.hexdigest()[:16] == "b02ee8299dd9300f"


def test_worlds_differ_in_which_fields_carry_signal():
    """World 2 puts signal in the user and the image (brightness), none in title words; world 7 the reverse for
    image and title words. The drawn structure shows in the generated signal, not only in the description."""
    w2, w7 = draw_world(2), draw_world(7)
    assert w2.strength["image"] > 0 and w2.strength["text"] == 0 and w2.image_cue == "brightness"
    assert w7.strength["image"] == 0 and w7.strength["text"] > 0 and w7.image_cue == "none"
    for world, image_carries, text_carries in ((2, True, False), (7, False, True)):
        posts, signal, _ = make_posts(1500, 500, 0, world=world)
        hot = np.array([sum(w in HOT_TITLE_WORDS for w in t.split()) for t in posts.title])
        image_r = abs(np.corrcoef(posts.attrs["appeal"], signal)[0, 1])
        text_r = abs(np.corrcoef(hot, signal)[0, 1])
        assert (image_r > 0.2) == image_carries and (text_r > 0.2) == text_carries, (world, image_r, text_r)
    assert draw_world(3) == draw_world(3) and draw_world(3) != draw_world(4)


def test_drawn_world_mess_and_image_cue(tmp_path):
    """World 1: a third of its test posts come from users unseen in training and ~14% of images are missing; its
    image cue is brightness (the drawn appeal shows in mean pixel value, not in a class palette)."""
    posts, _, _ = make_posts(600, 200, 0, world=1, n_subcategories=4)
    train, test = posts[posts.split == "train"], posts[posts.split == "test"]
    assert (~test.uid.isin(set(train.uid))).mean() > 0.25
    counts = generate(tmp_path, 300, 0, seed=0, world=1, n_subcategories=4)
    assert counts["missing_images"] > 15
    posts, _, _ = make_posts(300, 0, 0, world=1, n_subcategories=4)
    ok = [(tmp_path / p).is_file() and (tmp_path / p).stat().st_size > 2000 for p in posts.image_relpath]
    bright = np.array([np.asarray(Image.open(tmp_path / p)).mean() if k else np.nan
                       for p, k in zip(posts.image_relpath, ok)])
    keep = np.isfinite(bright)
    assert src(posts.attrs["appeal"][keep], bright[keep]) > 0.3
