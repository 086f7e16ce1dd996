"""The population figures of the sensitivity study, with their uncertainty.

With ``s_ix`` the sensitivity of unit ``i`` at image ``x`` (one eps) and ``r_ix`` the clean response
(Guo et al. 2022, section 3):

- ``sigma_i = std_x r_ix`` (population std, ddof 0, over the evaluated clean images);
- the normalised sensitivity ``s~_ix = s_ix / sigma_i``, and its population mean
  ``s~ = mean_{i, x} s~_ix`` over the m units and n images (units with ``sigma_i = 0`` are left out and
  counted: their normalised value is undefined);
- the random-pair baseline ``b_i = (1 / (n (n - 1))) sum_{j != k} |r_ij - r_ik| / sigma_i`` (every ordered
  pair of distinct images: the same mean as over unordered pairs) and ``b = mean_i b_i``.

Intervals: percentile bootstrap (Efron & Tibshirani 1993, ch. 13), **two-way** for ``s~``: each
resample draws the n images and the m units independently with replacement and takes the mean of the
resampled (unit x image) table, so the interval covers both sources of variation (the study averages
over both). The baseline's interval resamples the units (each ``b_i`` already averages every pair).

Comparisons between two models (``comparison.csv``): on the same images, ``diff = s~_b - s~_a`` and
``ratio = s~_a / s~_b``, each with the bootstrap interval in which the images are resampled jointly
(paired) and the units of each model independently (units of two networks are not the same units), or
jointly when both models measure the same sites of a readout (``paired_units``).
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000


def unit_sigma(clean: np.ndarray) -> np.ndarray:
    """(m,) ``std`` over images of the (m, n) clean responses (ddof 0)."""
    return np.std(np.asarray(clean, np.float64), axis=1)


def valid_units(sigma: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """(m,) bool: units with a positive spread (``sigma > 1e-12 * (1 + max |r|)``)."""
    scale = 1.0 + np.max(np.abs(np.asarray(clean, np.float64)), axis=1)
    return np.asarray(sigma > 1e-12 * scale)


def pair_baseline(clean: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """(m,) ``b_i``: the mean ``|r_ij - r_ik| / sigma_i`` over pairs of distinct images."""
    r = np.asarray(clean, np.float64)
    n = r.shape[1]
    if n < 2:
        return np.full(r.shape[0], np.nan)
    s = np.sort(r, axis=1)  # sum_{j<k} |r_j - r_k| = sum_k (2k - n + 1) s_k (sorted, k from 0)
    weights = 2 * np.arange(n) - n + 1
    total = s @ weights
    return total / (n * (n - 1) / 2) / np.where(sigma > 0, sigma, np.nan)


def _draws(rng, size: int, resamples: int) -> np.ndarray:
    """(resamples, size) counts of each index in a resample of ``size`` with replacement."""
    idx = rng.integers(0, size, size=(resamples, size))
    counts = np.zeros((resamples, size))
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)
    return counts


def _percentiles(means: np.ndarray, confidence: float) -> tuple:
    alpha = 1.0 - confidence
    lo, hi = np.nanpercentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def table_mean(table: np.ndarray, resamples: int = RESAMPLES, confidence: float = 0.95, seed: int = 0) -> tuple:
    """``(mean, low, high)`` of the (m units x n images) table with its two-way bootstrap interval."""
    t = np.asarray(table, np.float64)
    m, n = t.shape
    if m == 0 or n == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    wu, wx = _draws(rng, m, resamples), _draws(rng, n, resamples)
    means = np.einsum("bi,ij,bj->b", wu, t, wx) / (m * n)
    return (float(t.mean()),) + _percentiles(means, confidence)


def vector_mean(values: np.ndarray, resamples: int = RESAMPLES, confidence: float = 0.95, seed: int = 0) -> tuple:
    """``(mean, low, high)`` of a vector with its bootstrap interval."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = _draws(rng, v.size, resamples) @ v / v.size
    return (float(v.mean()),) + _percentiles(means, confidence)


def compare(table_a: np.ndarray, table_b: np.ndarray, paired_units: bool, resamples: int = RESAMPLES,
            confidence: float = 0.95, seed: int = 0) -> dict:
    """``diff = mean(b) - mean(a)`` and ``ratio = mean(a) / mean(b)`` of two (units x images) tables on
    the same images (columns), with bootstrap intervals (the module docstring)."""
    a, b = np.asarray(table_a, np.float64), np.asarray(table_b, np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError("the two tables must hold the same images")
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    wx = _draws(rng, n, resamples)
    wa = _draws(rng, a.shape[0], resamples)
    wb = wa if paired_units else _draws(rng, b.shape[0], resamples)
    ma = np.einsum("bi,ij,bj->b", wa, a, wx) / (a.shape[0] * n)
    mb = np.einsum("bi,ij,bj->b", wb, b, wx) / (b.shape[0] * n)
    mean_a, mean_b = float(a.mean()), float(b.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = ma / mb
        ratio = mean_a / mean_b if mean_b != 0 else float("nan")
    d_lo, d_hi = _percentiles(mb - ma, confidence)
    r_lo, r_hi = _percentiles(ratios[np.isfinite(ratios)], confidence) if np.isfinite(ratios).any() else (
        float("nan"), float("nan"))
    return {"mean_a": mean_a, "mean_b": mean_b, "diff": mean_b - mean_a, "diff_low": d_lo, "diff_high": d_hi,
            "ratio": ratio, "ratio_low": r_lo, "ratio_high": r_hi}
