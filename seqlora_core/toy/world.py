"""The toy world: procedurally drawn, captioned pictures, and the readers that check them.

Every picture is one flat shape (circle, square or triangle) of one colour, near the centre at
about a third of the image, on a background of another colour, captioned
``a <colour> <shape> on a <colour> background``. A gentle lighting gradient and pixel noise
give the VAE some texture to learn beyond flat colour. Nothing here is a photo: the photos are
the concepts trained later.

The same module reads a picture back (object and background colour from the pixels, the shape
from how much of its bounding box the object fills), so the base is measured by the world's
own ground truth: a generated picture follows its caption when both colours read back equal.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

# Saturated, far-apart colours, so that a reading by nearest palette entry is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 40), "white": (245, 245, 245), "black": (15, 15, 15)}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
HELD_OUT_SEED = 7  # which captions the pretraining never sees (``held_out_specs``)
HELD_OUT_SHARE = 0.1


@dataclass(frozen=True)
class Spec:
    """One caption's content."""
    colour: str
    shape: str
    background: str

    def same_colours(self, other: "Spec") -> bool:
        """Whether ``other`` (a picture read back) has this caption's object and background
        colours: what "the caption is followed" means (the shape is reported apart)."""
        return (self.colour, self.background) == (other.colour, other.background)

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_specs() -> list[Spec]:
    """The 90 captions: every shape in every colour on every other colour."""
    return [Spec(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b]


def held_out_specs() -> list[Spec]:
    """A fixed tenth of the captions, never drawn in pretraining: the caption-following test
    asks for colour/shape/background combinations the base has not seen together. Chosen so
    that every colour still appears as an object and as a background in the training share."""
    rng = random.Random(HELD_OUT_SEED)
    specs = all_specs()
    while True:
        held = rng.sample(specs, round(len(specs) * HELD_OUT_SHARE))
        train = [s for s in specs if s not in held]
        seen = {(s.colour, s.shape) for s in train}, {s.background for s in train}
        if len(seen[0]) == len(COLOURS) * len(SHAPES) and len(seen[1]) == len(COLOURS):
            return held


def training_specs() -> list[Spec]:
    held = set(held_out_specs())
    return [s for s in all_specs() if s not in held]


def draw(spec: Spec, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: the shape at about a third of the image, jittered in size and
    position, on a lit, slightly noisy background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    side = size * rng.uniform(0.30, 0.38)
    cx, cy = size / 2 + rng.uniform(-1, 1) * size / 16, size / 2 + rng.uniform(-1, 1) * size / 16
    if spec.shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= (side / 2) ** 2
    elif spec.shape == "square":
        inside = (np.abs(xx - cx) <= side / 2) & (np.abs(yy - cy) <= side / 2)
    else:  # equilateral, pointing up, centroid at (cx, cy)
        h = side * np.sqrt(3) / 2
        top, bottom = cy - 2 * h / 3, cy + h / 3
        half_width = (yy - top) / h * side / 2
        inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
    image = np.empty((size, size, 3), np.float32)
    image[:] = PALETTE[spec.background]
    image[inside] = PALETTE[spec.colour]
    angle = rng.uniform(0, 2 * np.pi)
    light = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size  # in [-0.7, 0.7]
    image += light[..., None] * rng.uniform(0, 30)
    image += rng.normal(0, 5, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def batch(specs: list[Spec], size: int, rng: np.random.Generator) -> np.ndarray:
    """(N, 3, size, size) float32 in [-1, 1], as the VAE takes pixels."""
    arrays = np.stack([draw(s, size, rng) for s in specs])
    return arrays.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    ref = np.array([PALETTE[n] for n in names], np.float32)
    return names[int(np.argmin(((ref - rgb.astype(np.float32)) ** 2).sum(1)))]


def read(image: np.ndarray) -> Spec:
    """What a (size, size, 3) uint8 picture shows, by the world's rules: the background is the
    median of a border frame, the object the median of a central patch, the shape the share of
    its bounding box that pixels nearer the object's colour than the background's fill
    (circle π/4, square 1, triangle 1/2)."""
    size = image.shape[0]
    frame = max(2, size // 16)
    border = np.concatenate([image[:frame].reshape(-1, 3), image[-frame:].reshape(-1, 3),
                             image[:, :frame].reshape(-1, 3), image[:, -frame:].reshape(-1, 3)])
    lo, hi = size // 2 - size // 16, size // 2 + size // 16 + 1
    centre = image[lo:hi, lo:hi].reshape(-1, 3)
    bg_rgb, obj_rgb = np.median(border, 0), np.median(centre, 0)
    pixels = image.astype(np.float32)
    nearer = ((pixels - obj_rgb) ** 2).sum(-1) < ((pixels - bg_rgb) ** 2).sum(-1)
    ys, xs = np.nonzero(nearer)
    if len(ys) == 0:
        fill = 0.0
    else:
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill = len(ys) / box
    shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
    return Spec(nearest_colour(obj_rgb), shape, nearest_colour(bg_rgb))
