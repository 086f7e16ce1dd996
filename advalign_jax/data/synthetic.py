"""Synthetic ClickMe: learnable images with a known "human" map, and an optional spurious cue.

Each image shows one **class-defining object** (its shape is the class: disk, square, triangle, plus,
ring, diamond, X, frame, crescent, bars, hexagon, star) with a random colour, size, rotation and place,
among **distractors** that belong to no class (soft blobs and thin strokes), on a textured background.
The "human" map is the object's silhouette, dilated and blurred the way aggregated clicks are, with
peak 255: it marks exactly the pixels that decide the class.

The optional **spurious cue** (``cue``) carries the colour of one class: its own class with probability
``spurious`` and otherwise a uniformly drawn class (so it matches the label with probability
``spurious + (1 - spurious) / num_classes``). A model can shortcut the task through it; the human map
never marks it. ``spurious=0`` keeps the cue but makes it uninformative (a test set for shortcut
reliance). Two carriers:

- ``'patch'``: a small square of the class colour in the top-left corner, a localised shortcut (the
  kind the harmonizer's saliency term can see);
- ``'tint'``: the whole background tinted with the class colour. Its input-gradient is nearly uniform,
  and the harmonizer standardises saliency maps (subtracting their mean) before comparing them, so this
  shortcut is almost invisible to that loss;
- ``'none'``: neither.

The **cue-swap test** regenerates an example with only its cue changed (``make_example(i, spec,
cue_class=k)``: the same draws, every pixel outside the cue and the map unchanged); :func:`example_cue`
gives the class an example's cue shows and :func:`cue_region` the patch's pixels at any image size.

Everything is a function of ``(seed, image index)``: the same seed gives the same images whatever the
number of shards or the order of generation.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from scipy import ndimage

CUES = ("patch", "tint", "none")
PATCH = (0.03, 0.15)  # the patch cue's square: from 3% to 15% of the side, top-left

SHAPES = ("disk", "square", "triangle", "plus", "ring", "diamond", "x", "frame", "crescent", "bars",
          "hexagon", "star")


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    num_classes: int = 10
    size: int = 256
    seed: int = 0
    cue: str = "patch"  # the spurious cue's carrier: 'patch', 'tint' or 'none'
    spurious: float = 0.0  # probability that the cue shows the label's colour, else a random class's
    num_distractors: tuple = (3, 7)  # [low, high) distractors per image
    object_radius: tuple = (0.14, 0.22)  # object radius, as a fraction of the image side
    map_blur: float = 0.035  # Gaussian sigma of the human map, fraction of the image side

    def __post_init__(self):
        if not 2 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got {self.num_classes}")
        if not 0.0 <= self.spurious <= 1.0:
            raise ValueError(f"spurious must be in [0, 1], got {self.spurious}")
        if self.cue not in CUES:
            raise ValueError(f"cue must be one of {CUES}, got {self.cue!r}")
        if self.spurious > 0 and self.cue == "none":
            raise ValueError("spurious > 0 needs a cue ('patch' or 'tint')")
        if self.size < 16:
            raise ValueError(f"size must be at least 16, got {self.size}")


def _sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) of a unit-radius shape at local coords (u, v)."""
    r = np.hypot(u, v)
    au, av = np.abs(u), np.abs(v)
    if shape == "disk":
        return r - 0.95
    if shape == "square":
        return np.maximum(au, av) - 0.75
    if shape == "triangle":
        return np.maximum(0.866 * au + 0.5 * v, -v) - 0.5
    if shape == "plus":
        return np.minimum(np.maximum(au - 0.28, av - 0.95), np.maximum(av - 0.28, au - 0.95))
    if shape == "ring":
        return np.abs(r - 0.72) - 0.2
    if shape == "diamond":
        return (au + av) * 0.7071 - 0.68
    if shape == "x":
        return _sdf("plus", (u + v) * 0.7071, (v - u) * 0.7071)
    if shape == "frame":
        return np.abs(np.maximum(au, av) - 0.68) - 0.15
    if shape == "crescent":
        return np.maximum(r - 0.95, 0.75 - np.hypot(u - 0.45, v + 0.1))
    if shape == "bars":
        return np.minimum(np.maximum(au - 0.95, np.abs(v - 0.5) - 0.2), np.maximum(au - 0.95, np.abs(v + 0.5) - 0.2))
    if shape == "hexagon":
        return np.maximum(au * 0.866 + av * 0.5, av) - 0.78
    if shape == "star":
        theta = np.arctan2(v, u)
        return r - (0.55 + 0.4 * np.cos(5 * theta))
    raise ValueError(shape)


def _class_colour(c: int, num_classes: int) -> np.ndarray:
    """A distinct tint per class (evenly spaced hues), RGB in 0..1."""
    hue = c / num_classes
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)  # HSV(h, 1, 1) -> RGB


def cue_of(rng: np.random.Generator, label: int, spec: SynthSpec) -> int:
    """The class whose colour the cue shows: ``label`` with probability ``spurious``, else a uniformly
    drawn class. Both draws are always made, so examples of the same seed and index differ only in
    their cue whatever ``spurious`` is."""
    informative = rng.random() < spec.spurious
    other = int(rng.integers(spec.num_classes))
    return label if informative else other


def example_cue(index: int, spec: SynthSpec) -> int:
    """The class whose colour example ``index`` shows as its cue (what :func:`make_example` draws)."""
    rng = np.random.default_rng([spec.seed, index])
    s = spec.size
    rng.normal(size=(s // 8, s // 8))  # the background texture is drawn first
    return cue_of(rng, int(index % spec.num_classes), spec)


def cue_region(size: int) -> tuple[slice, slice]:
    """(rows, columns) of the patch cue in an image of side ``size``: the pixels whose top-left corner
    ``(j / size)`` lies in ``[PATCH[0], PATCH[1])``, the rule :func:`make_example` paints with (on the
    generated side; on a resized image the region's edge is blurred by about one pixel)."""
    lo, hi = (int(np.ceil(PATCH[0] * size - 1e-9)), int(np.ceil(PATCH[1] * size - 1e-9)))
    return slice(lo, hi), slice(lo, hi)


def _blur(x: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur with reflective edges (the map's "click aggregation")."""
    return ndimage.gaussian_filter(x, sigma_px, mode="reflect")


def make_example(index: int, spec: SynthSpec, cue_class: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(image float32 (S, S, 3) in 0..255, map float32 (S, S) in 0..255, label) for one index.

    ``cue_class`` paints the cue in that class's colour instead of the drawn one; every other pixel and
    the map are those of the unchanged example (the random draws are the same): the images of the
    cue-swap test.
    """
    if cue_class is not None and not 0 <= int(cue_class) < spec.num_classes:
        raise ValueError(f"cue_class must be in [0, {spec.num_classes}), got {cue_class}")
    rng = np.random.default_rng([spec.seed, index])
    s = spec.size
    label = int(index % spec.num_classes)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s  # pixel centres, [0, 1)

    # Background: smooth low-frequency texture with a random (uninformative) tint.
    texture = _blur(rng.normal(size=(s // 8, s // 8)), 1.0)
    texture = np.kron(texture, np.ones((8, 8)))[:s, :s]
    base = 0.45 + 0.12 * texture / (np.abs(texture).max() + 1e-6)
    image = np.repeat(base[..., None], 3, axis=-1)
    cue = cue_of(rng, label, spec)
    if cue_class is not None:
        cue = int(cue_class)
    background = cue if spec.cue == "tint" else int(rng.integers(spec.num_classes))
    image = 0.55 * image + 0.45 * _class_colour(background, spec.num_classes) * (0.6 + 0.4 * base[..., None])

    def paint(alpha, colour):
        nonlocal image
        image = image * (1 - alpha[..., None]) + alpha[..., None] * colour

    # Distractors: class-free soft blobs and thin strokes.
    for _ in range(int(rng.integers(*spec.num_distractors))):
        colour = rng.uniform(0.05, 0.95, size=3)
        cx, cy = rng.uniform(0.05, 0.95, size=2)
        if rng.random() < 0.5:
            sig = rng.uniform(0.02, 0.05)
            alpha = 0.8 * np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / sig ** 2)
        else:
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.35)
            du, dv = np.cos(angle), np.sin(angle)
            along = (xx - cx) * du + (yy - cy) * dv
            across = -(xx - cx) * dv + (yy - cy) * du
            dist = np.maximum(np.abs(across) - 0.004, np.abs(along) - length / 2)
            alpha = np.clip(0.5 - dist * s, 0.0, 1.0)
        paint(alpha, colour)

    # The class-defining object.
    radius = rng.uniform(*spec.object_radius)
    cx, cy = rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2)
    angle = rng.uniform(-0.35, 0.35)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * ca + (yy - cy) * sa) / radius
    v = (-(xx - cx) * sa + (yy - cy) * ca) / radius
    v = -v  # shapes are defined with v pointing up
    sdf = _sdf(SHAPES[label], u, v) * radius  # in units of the image side
    alpha = np.clip(0.5 - sdf * s, 0.0, 1.0)  # one-pixel antialiased edge
    colour = rng.uniform(0.0, 1.0, size=3)
    colour = colour * 0.9 if colour.mean() > 0.5 else colour * 0.9 + 0.1  # keep off mid-grey only
    paint(alpha, colour)

    if spec.cue == "patch":  # the spurious patch, drawn last so nothing covers it
        inside = (xx >= PATCH[0]) & (xx < PATCH[1]) & (yy >= PATCH[0]) & (yy < PATCH[1])
        paint(inside.astype(np.float32), _class_colour(cue, spec.num_classes) * 0.9)

    # The human map: silhouette dilated by a few pixels and blurred; peak 255.
    silhouette = (sdf < 0.015).astype(np.float32)
    heat = _blur(silhouette, max(1.0, spec.map_blur * s))
    heat = 255.0 * heat / max(heat.max(), 1e-6)
    return (np.clip(image, 0, 1) * 255.0).astype(np.float32), heat.astype(np.float32), label
