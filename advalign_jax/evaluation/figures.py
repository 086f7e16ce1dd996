"""Figures: drawing to PNG files atomically, axes that do not magnify noise, the shared image grids.

Every figure is drawn with matplotlib on its Agg backend (files only) and saved through
:func:`advalign_jax.store.atomic_write` (:func:`save_figure`), so a crash leaves the old figure or the
new one. :func:`honest_limits` is the rule every figure's axes follow; :func:`model_grid` draws the same
images for several models side by side (the ClickMe evaluations' ``perturbations.png`` and
``saliency.png``); :func:`draw_cue` outlines the synthetic data's patch cue (:func:`cue_mask`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

from advalign_jax import store
from advalign_jax.data.synthetic import cue_region


def pyplot():
    """matplotlib's pyplot on its Agg backend (figures go to files)."""
    import matplotlib  # heavy (about a second): imported only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported only when a figure is drawn

    return plt


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Saves a matplotlib figure atomically and closes it."""
    try:
        store.atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"), binary=True)
    finally:
        pyplot().close(fig)


def honest_limits(centres, lows, highs, min_span: float, bounds=(-math.inf, math.inf),
                  include=None) -> tuple[float, float]:
    """Axis limits that never magnify a gap inside its noise.

    The rule: the axis shows every interval ``[low, high]`` (and ``include``, e.g. 0 for a ratio
    scale), padded by 10% on each side, and spans at least ``max(min_span, 4 * w)``, ``w`` the widest
    interval on it, centred on the data; the limits are then kept inside the metric's ``bounds`` (the
    span is shifted, not shrunk, where it can be). So two means whose intervals overlap are never drawn
    further apart than about a quarter of the axis, and ``min_span`` (a fixed share of the metric's
    scale: 0.5 of Spearman's [-1, 1], 0.5 of a proportion's [0, 1]) keeps a noiseless tiny gap small.
    """
    values = [float(v) for v in list(centres) + list(lows) + list(highs) if math.isfinite(float(v))]
    if include is not None:
        values.append(float(include))
    if not values:
        return (0.0, 1.0) if not math.isfinite(bounds[0]) else (bounds[0], bounds[0] + max(min_span, 1.0))
    widths = [float(h) - float(l) for l, h in zip(lows, highs) if math.isfinite(float(h) - float(l))]
    lo, hi = min(values), max(values)
    span = max(hi - lo, min_span, 4.0 * max(widths, default=0.0))
    pad = 0.1 * span
    centre = (lo + hi) / 2.0
    lo, hi = centre - span / 2.0 - pad, centre + span / 2.0 + pad
    if lo < bounds[0]:
        lo, hi = bounds[0], min(bounds[1], hi + (bounds[0] - lo))
    if hi > bounds[1]:
        lo, hi = max(bounds[0], lo - (hi - bounds[1])), bounds[1]
    return lo, hi


def normalised(im, lo=None, hi=None):
    """``(im - lo) / (hi - lo)`` clipped to [0, 1] (default: the image's own minimum and maximum)."""
    lo = float(im.min()) if lo is None else lo
    hi = float(im.max()) if hi is None else hi
    return np.clip((im - lo) / max(hi - lo, 1e-12), 0, 1)


def cue_mask(size: int) -> np.ndarray:
    """(size, size) 0/1: the synthetic data's patch cue at this image size."""
    m = np.zeros((size, size), np.float32)
    m[cue_region(size)] = 1.0
    return m


def draw_cue(ax, size: int, has_cue: bool) -> None:
    """Outlines the synthetic data's patch cue on an image axis of side ``size``."""
    if not has_cue:
        return
    rows, _ = cue_region(size)
    ax.add_patch(pyplot().Rectangle((rows.start - 0.5, rows.start - 0.5), rows.stop - rows.start,
                                    rows.stop - rows.start, fill=False, edgecolor="white", lw=1.2, ls="--"))


def model_grid(path: str, named_panels: Sequence[tuple], has_cue: bool, max_images: int, image: Callable,
               map_key: str, title: Callable, missing: Optional[str], suptitle: str) -> None:
    """A figure with one row per image (the first ``max_images`` record indices that any model has a
    panel for) and the columns image, human map, then each model's ``panel[map_key]`` titled
    ``title(name, panel, cue_text)`` (``missing`` where the model has no panel for the image), the
    patch cue outlined when ``has_cue``. ``image(panel)`` gives the RGB image to show."""
    plt = pyplot()
    by_model = [(name, {int(p["img"]): p for p in panels}) for name, panels in named_panels]
    images = sorted(set().union(*(set(d) for _, d in by_model)))[:max_images]
    if not images:
        return
    ncol = 2 + len(by_model)
    fig, axes = plt.subplots(len(images), ncol, figsize=(1.9 * ncol, 2.0 * len(images) + 0.4), squeeze=False)
    for row, img in zip(axes, images):
        first = next(d[img] for _, d in by_model if img in d)
        shown = image(first)
        row[0].imshow(shown)
        row[0].set_title(f"#{img}, label {first['label']}", fontsize=7)
        row[1].imshow(first["heatmap"], cmap="jet")
        row[1].set_title("human map", fontsize=7)
        for ax, (name, d) in zip(row[2:], by_model):
            if img in d:
                p = d[img]
                ax.imshow(p[map_key], cmap="inferno")
                cue = f", patch {100 * float(p['cue_mass']):.1f}%" if has_cue and "cue_mass" in p else ""
                ax.set_title(title(name, p, cue), fontsize=6)
            elif missing:
                ax.set_title(f"{name}\n{missing}", fontsize=6)
        for ax in row:
            draw_cue(ax, shown.shape[0], has_cue)
            ax.axis("off")
    fig.suptitle(suptitle + ("; dashed: the spurious patch cue" if has_cue else ""), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
