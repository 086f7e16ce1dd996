"""Summaries of per-image rows: means with bootstrap intervals, and paired comparisons between models.

- **Intervals** (:mod:`advalign_jax.evaluation.stats`): a summary's means carry 95% percentile
  bootstrap intervals (``config.bootstrap``: ``resamples``, ``confidence``, ``seed``;
  :func:`bootstrap_options`, :func:`with_interval`).
- **Paired comparisons** (:func:`compare_models`): for every pair of models of a run, the paired
  difference of each metric over the images both were evaluated on, with its bootstrap interval and
  the Wilcoxon signed-rank p-value: the rows of ``comparison.csv`` (:data:`COMPARISON_COLUMNS`).
"""

from __future__ import annotations


import numpy as np

from advalign_jax.errors import ConfigError
from advalign_jax.evaluation import stats

COMPARISON_COLUMNS = ["metric", "model_a", "model_b", "num_pairs", "mean_a", "mean_b", "diff", "diff_low",
                      "diff_high", "wilcoxon_p"]


def bootstrap_options(config) -> dict:
    """``resamples``, ``confidence``, ``seed`` of ``config.bootstrap`` for :mod:`stats` (checked)."""
    b = config.bootstrap
    if int(b.resamples) < 1:
        raise ConfigError(f"bootstrap.resamples must be at least 1, got {b.resamples}")
    if not 0.0 < float(b.confidence) < 1.0:
        raise ConfigError(f"bootstrap.confidence must be in (0, 1), got {b.confidence}")
    return {"resamples": int(b.resamples), "confidence": float(b.confidence), "seed": int(b.seed)}


def with_interval(row: dict, key: str, values, boot: dict) -> None:
    """Sets ``row[key]`` to the mean of the finite ``values`` and ``row[key + '_low' / '_high']`` to its
    bootstrap interval."""
    row[key], row[f"{key}_low"], row[f"{key}_high"] = stats.mean_with_interval(values, **boot)


def compare_models(rows_by_model: dict, metrics: dict, boot: dict) -> list[dict]:
    """The rows of ``comparison.csv``: for every metric and every pair of models (a before b in the run's
    order), :func:`stats.paired_comparison` of ``metric(row)`` over the images both models have a row
    for (pairs where either value is NaN are left out): ``diff = mean(b - a)``."""
    names = list(rows_by_model)
    out = []
    for metric, value in metrics.items():
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                common = sorted(set(rows_by_model[a]) & set(rows_by_model[b]), key=int)
                va = [value(rows_by_model[a][img]) for img in common]
                vb = [value(rows_by_model[b][img]) for img in common]
                c = stats.paired_comparison(va, vb, **boot)
                out.append({"metric": metric, "model_a": a, "model_b": b, "num_pairs": c.num_pairs,
                            "mean_a": c.mean_a, "mean_b": c.mean_b, "diff": c.diff, "diff_low": c.diff_low,
                            "diff_high": c.diff_high, "wilcoxon_p": c.wilcoxon_p})
    return out


def row_float(row: dict, key: str) -> float:
    """``float(row[key])`` for a summary row read back from CSV; NaN where the key is missing, empty or
    not a number (a model without that metric)."""
    try:
        return float(row.get(key, "nan"))
    except (TypeError, ValueError):
        return float("nan")


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return (float(np.mean(a)), float(np.std(a))) if a.size else (float("nan"), float("nan"))
