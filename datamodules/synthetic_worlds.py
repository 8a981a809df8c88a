"""Worlds of the synthetic generator: the structure of its latent popularity model, drawn from a seed.

    world = draw_world(3)        # which fields carry signal, how strongly, interactions, image cue, mess
    world.describe()             # one line for logs and benchmark tables

World 0 is the generator's original model (``datamodules/synthetic.py`` docstring) with its exact coefficients,
so the demo's data does not move. Any other index draws a new model:

* each field family (user, category, image, tags, text, time, geo) carries signal with some probability (the
  user with a higher one, as in real data); at least two do. Strengths are drawn, then scaled so the noise-free
  signal has a drawn standard deviation of 1.6-2.6 label units (the label stays in SMPD's range).
* the image cue says what in the pixels carries the image term: ``colour`` (hue of the scene), ``brightness``,
  ``texture`` (stripe contrast), ``object`` (which of 5 object shapes is drawn; a per-object effect) or
  ``none`` (the image carries nothing; the image term is zero). World 0's cue ``appeal`` is the original drawing
  (object size, brightness and saturation together).
* up to two interactions: ``user_x_image`` (a good user's images count more) and ``category_x_hour`` (each
  subcategory has its own best hour).
* mess: shares of missing and truncated images, empty titles, and test posts by users never seen in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

IMAGE_CUES = ("appeal", "colour", "brightness", "texture", "object", "none")
#: Field families whose strength a world draws, in the order their terms enter the signal.
FIELDS = ("user", "category", "image", "tags", "text", "time", "geo")
INTERACTIONS = ("user_x_image", "category_x_hour")
N_OBJECTS = 5


@dataclass(frozen=True)
class World:
    """One latent model. ``strength``: label units per field term for drawn worlds (the term's standard
    deviation over posts); world 0 keeps the original coefficients instead (``original=True``)."""

    index: int
    image_cue: str = "appeal"
    strength: dict[str, float] = field(default_factory=dict)
    interactions: dict[str, float] = field(default_factory=dict)
    signal_sd: float = 0.0
    noise_sd: float = 0.9
    missing_images: float = 0.01
    truncated_images: float = 0.01
    empty_titles: float = 0.15
    new_users: float = 0.0
    original: bool = False

    def describe(self) -> str:
        if self.original:
            return "world 0 (original: user-dominant, appeal image cue)"
        sig = ", ".join(f"{k}={v:.2f}" for k, v in self.strength.items() if v > 0) or "none"
        inter = ", ".join(f"{k}={v:.2f}" for k, v in self.interactions.items()) or "none"
        return (f"world {self.index}: signal [{sig}], interactions [{inter}], image cue {self.image_cue}, "
                f"noise sd {self.noise_sd:.2f}, missing images {self.missing_images:.0%}, "
                f"empty titles {self.empty_titles:.0%}, new test users {self.new_users:.0%}")

    def to_dict(self) -> dict:
        return asdict(self)


ORIGINAL = World(index=0, original=True)


def draw_world(index: int) -> World:
    """World ``index``: 0 is the original model; any other index draws one (deterministic per index)."""
    if index < 0:
        raise ValueError(f"data.synthetic.world must be >= 0, got {index}")
    if index == 0:
        return ORIGINAL
    rng = np.random.default_rng([index, 20261123])
    p_on = {"user": 0.8, "category": 0.6, "image": 0.6, "tags": 0.5, "text": 0.5, "time": 0.5, "geo": 0.4}
    on = {f: bool(rng.random() < p_on[f]) for f in FIELDS}
    while sum(on.values()) < 2:
        on[FIELDS[int(rng.integers(len(FIELDS)))]] = True
    raw = {f: float(rng.uniform(0.3, 1.0)) if on[f] else 0.0 for f in FIELDS}
    cue = str(rng.choice(IMAGE_CUES[1:5])) if on["image"] else "none"
    signal_sd = float(rng.uniform(1.6, 2.6))
    inter = {k: float(rng.uniform(0.3, 0.8)) for k in INTERACTIONS if rng.random() < 0.4}
    if cue == "none":
        inter.pop("user_x_image", None)
    norm = float(np.sqrt(sum(v * v for v in raw.values()) + sum(v * v for v in inter.values())))
    scale = signal_sd / norm
    return World(
        index=index, image_cue=cue,
        strength={f: round(v * scale, 4) for f, v in raw.items()},
        interactions={k: round(v * scale, 4) for k, v in inter.items()},
        signal_sd=round(signal_sd, 4),
        noise_sd=round(float(rng.uniform(0.6, 1.3)), 4),
        missing_images=round(float(rng.uniform(0.0, 0.15)), 4),
        truncated_images=round(float(rng.uniform(0.0, 0.03)), 4),
        empty_titles=round(float(rng.uniform(0.05, 0.5)), 4),
        new_users=round(float(rng.uniform(0.0, 0.4)), 4),
    )


def standardised(x: np.ndarray) -> np.ndarray:
    """(n,) -> (n,) zero mean, unit standard deviation; a constant input gives zeros."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return np.zeros_like(x) if sd == 0 else (x - x.mean()) / sd
