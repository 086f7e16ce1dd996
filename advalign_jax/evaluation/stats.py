"""Uncertainty of the evaluations' means: percentile bootstrap intervals and paired comparisons.

Pure NumPy/SciPy functions of per-image values (the evaluations' ``summary.csv`` and
``comparison.csv`` are made of them):

- :func:`bootstrap_interval`: the percentile bootstrap interval of a mean (Efron & Tibshirani, *An
  Introduction to the Bootstrap*, 1993, ch. 13). With ``x_1..x_n`` the values, draw ``B`` resamples
  ``x*_b`` of ``n`` values with replacement, take each resample's mean ``m*_b``; the level-``c``
  interval is ``[q(alpha / 2), q(1 - alpha / 2)]``, ``alpha = 1 - c``, where ``q`` are the quantiles of
  ``{m*_b}`` with linear interpolation (``numpy.percentile``'s default), as
  ``scipy.stats.bootstrap(..., method='percentile')`` computes it. The draws come from
  ``numpy.random.default_rng(seed)``: the same seed gives the same interval.
- :func:`t_interval`: the Student-t interval of a mean over a few values (the seeds of a training
  recipe).
- :func:`paired_comparison`: two models evaluated on the same images. Over the images where both
  values are finite, ``d_i = b_i - a_i``; the difference is ``mean(d)`` with the bootstrap interval of
  that mean (the images resampled as pairs), and the two-sided Wilcoxon signed-rank test of ``d``
  being symmetric about 0 (Wilcoxon 1945; ``scipy.stats.wilcoxon`` with its defaults: zero
  differences dropped, the exact null distribution for small samples without ties, the normal
  approximation otherwise). All differences zero: no evidence of a difference, ``p = 1``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
_CHUNK_VALUES = 1 << 22  # resample draws held at once (values x resamples), bounds the memory


def bootstrap_interval(values: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                       confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """(low, high): the percentile bootstrap interval of ``mean(values)`` (module docstring).

    ``values`` must be finite (callers leave undefined values out and count them); no value gives
    ``(nan, nan)`` and a single value ``(v, v)``.
    """
    x = np.asarray(values, np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_interval needs finite values; leave undefined ones out")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_VALUES // n)
    means = np.empty(resamples, np.float64)
    for start in range(0, resamples, per_chunk):
        stop = min(start + per_chunk, resamples)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.percentile(means, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """``b - a`` over the images where both are defined (:func:`paired_comparison`)."""

    num_pairs: int
    mean_a: float
    mean_b: float
    diff: float  # mean of b_i - a_i
    diff_low: float
    diff_high: float
    wilcoxon_p: float


def wilcoxon_p(d: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of the differences ``d`` (scipy's defaults);
    ``1`` when every difference is zero, ``nan`` without differences."""
    d = np.asarray(d, np.float64)
    if d.size == 0:
        return float("nan")
    if not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def paired_comparison(a: Sequence[float], b: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                      confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> PairedComparison:
    """Paired difference ``b - a`` of two models' per-image values on the same images (module
    docstring): pairs with a non-finite value on either side are left out."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = b - a
    nan = float("nan")
    if d.size == 0:
        return PairedComparison(0, nan, nan, nan, nan, nan, nan)
    low, high = bootstrap_interval(d, resamples, confidence, seed)
    return PairedComparison(int(d.size), float(a.mean()), float(b.mean()), float(d.mean()), low, high,
                            wilcoxon_p(d))


def mean_with_interval(values: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                       confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of the finite ``values`` (:func:`bootstrap_interval`); NaNs without any."""
    x = np.asarray(values, np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = bootstrap_interval(x, resamples, confidence, seed)
    return float(x.mean()), low, high


def t_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the mean of a few values (e.g. one per training seed) with its Student-t
    interval ``mean -/+ t_{(1 + c) / 2, n - 1} * s / sqrt(n)`` (``s``: the sample standard deviation),
    as ``scipy.stats.t.interval(c, n - 1, loc=mean, scale=sem)``; one value gives NaN bounds."""
    x = np.asarray(values, np.float64).ravel()
    n = x.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if n < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def is_finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
