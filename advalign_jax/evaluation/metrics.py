"""Alignment and perturbation metrics, in JAX, batched (leading axis = images).

- :func:`spearman`: Spearman rank correlation over all pixels, **average ranks for ties**
  (``scipy.stats.spearmanr``); an image whose map is constant has no defined correlation:
  :func:`spearman` returns NaN there and :func:`spearman_defined` says which images are defined, so
  callers count them and keep them out of means.
- :func:`perturbation_mask`: ``| mean over channels of (x_adv - x) |`` (signed mean first; no blur),
  the adversarial-alignment study's mask.
- :func:`l2_norm`, :func:`linf_norm`: norms of ``x_adv - x`` over the whole image.
- :func:`top_fraction_dice`, :func:`top_fraction_iou`: maps binarised at their own 90th percentile
  (NumPy's linear interpolation; strictly greater), ``2|A∩B| / (|A|+|B|+1e-9)`` and
  ``|A∩B| / (|A∪B|+1e-9)``, as the harmonization package's ``evaluation/metrics.py``.
- :func:`region_fraction`: the share of a non-negative map's mass inside a region,
  ``sum_{p in R} m_p / sum_p m_p`` (NaN for an all-zero map); with the synthetic data's patch as ``R``,
  how much of an attack or a saliency map lies on the spurious cue (the patch covers 1.4% of the image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DICE_EPS = 1e-9


def average_ranks(v):
    """1-based ranks of a 1-D array, ties sharing their average rank (``scipy.stats.rankdata``)."""
    s = jnp.sort(v)
    left = jnp.searchsorted(s, v, side="left")
    right = jnp.searchsorted(s, v, side="right")
    return (left + right + 1).astype(jnp.float32) / 2.0


def _centred_double_ranks(v):
    """``2 * rank - (n + 1)``: centred ranks times two, exact integers in float32 for n < 2**23."""
    n = v.shape[0]
    s = jnp.sort(v)
    left = jnp.searchsorted(s, v, side="left")
    right = jnp.searchsorted(s, v, side="right")
    return (left + right + 1 - (n + 1)).astype(jnp.float32)


def _spearman_one(a, b):
    ra, rb = _centred_double_ranks(a.ravel()), _centred_double_ranks(b.ravel())
    saa, sbb = jnp.sum(ra * ra), jnp.sum(rb * rb)
    defined = jnp.logical_and(saa > 0, sbb > 0)
    rho = jnp.sum(ra * rb) / jnp.sqrt(jnp.where(defined, saa * sbb, 1.0))
    return jnp.where(defined, jnp.clip(rho, -1.0, 1.0), jnp.nan), defined


def spearman(a, b):
    """Per-image Spearman correlation of two batches of maps (N, ...) -> (N,); NaN where undefined."""
    return jax.vmap(_spearman_one)(a, b)[0]


def spearman_defined(a, b):
    """(N,) bool: both maps of the image vary, so their Spearman correlation is defined."""
    return jax.vmap(_spearman_one)(a, b)[1]


def perturbation_mask(x_adv, x):
    """``|mean_c(x_adv - x)|`` for NHWC batches -> (N, H, W)."""
    return jnp.abs(jnp.mean(x_adv - x, axis=-1))


def l2_norm(d):
    """Per-image L2 norm of a batch of perturbations (over all non-batch axes)."""
    return jnp.sqrt(jnp.sum(jnp.reshape(d, (d.shape[0], -1)) ** 2, axis=1))


def linf_norm(d):
    """Per-image Linf norm of a batch of perturbations."""
    return jnp.max(jnp.abs(jnp.reshape(d, (d.shape[0], -1))), axis=1)


def _binarise_top(h, fraction: float):
    flat = h.reshape(h.shape[0], -1)
    thr = jnp.percentile(flat, 100.0 * (1.0 - fraction), axis=1, method="linear", keepdims=True)
    return flat > thr


def top_fraction_dice(a, b, fraction: float = 0.1):
    """Sorensen-Dice of the maps' top ``fraction`` pixels, per image."""
    ba, bb = _binarise_top(a, fraction), _binarise_top(b, fraction)
    inter = jnp.sum(jnp.logical_and(ba, bb), axis=1).astype(jnp.float32)
    return 2.0 * inter / (jnp.sum(ba, axis=1) + jnp.sum(bb, axis=1) + DICE_EPS)


def top_fraction_iou(a, b, fraction: float = 0.1):
    """Intersection over union of the maps' top ``fraction`` pixels, per image."""
    ba, bb = _binarise_top(a, fraction), _binarise_top(b, fraction)
    inter = jnp.sum(jnp.logical_and(ba, bb), axis=1).astype(jnp.float32)
    union = jnp.sum(jnp.logical_or(ba, bb), axis=1).astype(jnp.float32)
    return inter / (union + DICE_EPS)


def region_fraction(m, region):
    """``sum(m * region) / sum(m)`` per image for maps (N, H, W) >= 0 and a (H, W) 0/1 ``region``; NaN
    where a map is all zero."""
    flat = m.reshape(m.shape[0], -1).astype(jnp.float32)
    total = jnp.sum(flat, axis=1)
    inside = flat @ jnp.reshape(region, (-1,)).astype(jnp.float32)
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), jnp.nan)
