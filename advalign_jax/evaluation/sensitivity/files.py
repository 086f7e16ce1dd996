"""What ``evaluate-sensitivity`` writes: per-item rows, ``summary.csv``, ``comparison.csv``,
``readout.csv`` and ``sensitivity.png``.

- ``per_item/MODEL.csv``: one row per (image, unit, eps) item (:data:`ITEM_COLUMNS`): ``item`` (its
  key: ``(eps_index * units + unit_index) * images + image``), ``image`` (position in the evaluated
  images), ``unit`` (the unit's name: its index in the layer, or the site's name), ``eps``, ``clean``
  (``r(x)``), ``sensitivity`` (untargeted: the estimate of ``max |r(x + d) - r(x)|``, a lower bound;
  targeted: ``|r(x + d) - r(x)|`` at the point reached), ``response`` (``r(x + d)`` at that point),
  ``sign`` (+1 / -1: which side won), ``restart``, ``norm`` (``||d||_2``), ``target`` (targeted mode:
  the level; else empty).
- ``summary.csv`` (:data:`SUMMARY_COLUMNS`), per model and eps: the units and images counted, units
  left out (zero spread over the images, or a readout's sites with zero variance), the raw mean, the normalised mean with its two-way bootstrap interval, the
  random-pair baseline with its interval, their ratio, the readout's cross-validated predictivity
  (sites only), and in the targeted mode the mean normalised distance to the target and the share of
  items brought within ``target.tolerance`` sigmas of it.
- ``comparison.csv`` (:data:`COMPARISON_COLUMNS`), per eps and pair of models (a before b in
  ``config.models``): ``diff = s~_b - s~_a`` and ``ratio = s~_a / s~_b`` with intervals
  (:func:`advalign_jax.evaluation.sensitivity.stats.compare`).
- ``readout.csv``: per model and site, the cross-validated Pearson r of the readout (sites only).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from advalign_jax.evaluation import figures
from advalign_jax.evaluation.sensitivity import stats

ITEM_COLUMNS = ["item", "image", "unit", "eps", "clean", "sensitivity", "response", "sign", "restart", "norm",
                "target"]
SUMMARY_COLUMNS = ["model", "layer", "reduce", "eps", "num_units", "num_images", "left_out_units", "sensitivity",
                   "normalized", "normalized_low", "normalized_high", "baseline", "baseline_low", "baseline_high",
                   "ratio_to_baseline", "readout_r", "target_distance", "target_reached"]
COMPARISON_COLUMNS = ["eps", "model_a", "model_b", "num_images", "mean_a", "mean_b", "diff", "diff_low",
                      "diff_high", "ratio", "ratio_low", "ratio_high"]
READOUT_COLUMNS = ["model", "site", "predictivity", "used"]


def valid_row(row: dict) -> bool:
    """Whether a per-item row's numbers parse (a damaged row is dropped and recomputed)."""
    try:
        for k in ("item", "image", "sign", "restart"):
            int(row[k])
        for k in ("eps", "clean", "sensitivity", "response", "norm"):
            if not math.isfinite(float(row[k])):
                return False
        return row["target"] == "" or math.isfinite(float(row["target"]))
    except (KeyError, ValueError, TypeError):
        return False


def tables(rows: dict, grid) -> tuple:
    """``{eps_index: (units x images) table}`` of the raw sensitivity and of the targeted distance
    ``|response - target|`` (NaN where untargeted), from the rows of one model (``grid``: the run's
    :class:`~advalign_jax.evaluation.sensitivity.job.Grid`)."""
    shape = (len(grid.eps), grid.num_units, grid.num_images)
    sens, dist = np.full(shape, np.nan), np.full(shape, np.nan)
    for key, r in rows.items():
        e, u, i = grid.unpack(int(key))
        if e < shape[0] and u < shape[1] and i < shape[2]:
            sens[e, u, i] = float(r["sensitivity"])
            if r["target"] != "":
                dist[e, u, i] = abs(float(r["response"]) - float(r["target"]))
    return sens, dist


def summary_rows(name: str, grid, units, rows: dict, sigma: np.ndarray, valid: np.ndarray, baseline: np.ndarray,
                 readout_r: float, tolerance: float, boot: dict, left_out: int = 0) -> list:
    """The ``summary.csv`` rows of one model (one per eps); ``left_out``: units left out before the
    measurement (a readout's sites with zero variance over the recordings), counted with the units of
    zero spread over the measured images."""
    sens, dist = tables(rows, grid)
    keep = valid & np.isfinite(sigma) & (sigma > 0)
    base = stats.vector_mean(baseline[keep], **boot)
    out = []
    for e, eps in enumerate(grid.eps):
        norm = sens[e][keep] / sigma[keep][:, None]
        mean = stats.table_mean(norm, **boot)
        row = {"model": name, "layer": units.layer, "reduce": units.reduce, "eps": float(eps),
               "num_units": int(keep.sum()), "num_images": grid.num_images, "left_out_units": int((~keep).sum()) + left_out,
               "sensitivity": float(np.nanmean(sens[e][keep])) if keep.any() else float("nan"),
               "normalized": mean[0], "normalized_low": mean[1], "normalized_high": mean[2],
               "baseline": base[0], "baseline_low": base[1], "baseline_high": base[2],
               "ratio_to_baseline": mean[0] / base[0] if base[0] else float("nan"),
               "readout_r": readout_r, "target_distance": "", "target_reached": ""}
        if grid.targeted:
            d = dist[e][keep] / sigma[keep][:, None]
            row["target_distance"] = float(np.mean(d))
            row["target_reached"] = float(np.mean(d <= tolerance))
        out.append(row)
    return out


def comparison_rows(names: Sequence[str], grids: dict, tables_by_model: dict, paired: dict, boot: dict) -> list:
    """The ``comparison.csv`` rows: every pair of models with the same images, at every common eps.
    ``tables_by_model[name][e]``: the normalised (units x images) table of valid units."""
    out = []
    for ia, a in enumerate(names):
        for b in names[ia + 1:]:
            ga, gb = grids[a], grids[b]
            if ga.num_images != gb.num_images:
                continue
            for e, eps in enumerate(ga.eps):
                if e >= len(gb.eps) or gb.eps[e] != eps:
                    continue
                ta, tb = tables_by_model[a][e], tables_by_model[b][e]
                if ta.size == 0 or tb.size == 0:
                    continue
                same_units = paired[a] is not None and paired[a] == paired[b]
                c = stats.compare(ta, tb, same_units, **boot)
                out.append({"eps": float(eps), "model_a": a, "model_b": b, "num_images": ga.num_images, **c})
    return out


def plot(path: str, summary: Sequence[dict], targeted: bool, log: bool = False, title: str = "") -> None:
    """``sensitivity.png``: the normalised sensitivity (or, targeted, the normalised distance to the
    target) against eps, per model, with its interval, and each model's random-pair baseline as a band.
    ``log``: both axes logarithmic (sensitivities that grow with eps over decades)."""
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    models = list(dict.fromkeys(r["model"] for r in summary))
    colours = plt.get_cmap("tab10")
    for k, name in enumerate(models):
        rows = [r for r in summary if r["model"] == name]
        eps = [float(r["eps"]) for r in rows]
        c = colours(k % 10)
        if targeted:
            ax.plot(eps, [float(r["target_distance"]) for r in rows], "o-", color=c, label=name)
            continue
        y = np.array([float(r["normalized"]) for r in rows])
        lo = np.array([float(r["normalized_low"]) for r in rows])
        hi = np.array([float(r["normalized_high"]) for r in rows])
        err = np.nan_to_num(np.maximum([y - lo, hi - y], 0.0))
        ax.errorbar(eps, y, yerr=err, fmt="o-", color=c, capsize=3, label=name)
        b = rows[0]
        if math.isfinite(float(b["baseline"])):
            ax.axhspan(float(b["baseline_low"]), float(b["baseline_high"]), color=c, alpha=0.15, lw=0)
            ax.axhline(float(b["baseline"]), color=c, ls="--", lw=1)
    ax.set_xlabel("eps (L2, [0, 1] pixels)")
    ax.set_ylabel("distance to target / sigma" if targeted else "normalised sensitivity s / sigma")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_title(title or ("targeted: distance to the level" if targeted else
                           "unit sensitivity (a lower bound); dashed: random image pairs"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.save_figure(fig, path)
