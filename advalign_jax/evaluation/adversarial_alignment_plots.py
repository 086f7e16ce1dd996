"""The adversarial-alignment figures: tolerance against alignment, the cue-swap bars, the panels and the
models side by side (:mod:`advalign_jax.evaluation.adversarial_alignment`'s output files)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from advalign_jax.evaluation.figures import draw_cue, honest_limits, model_grid, normalised, pyplot, save_figure
from advalign_jax.evaluation.summaries import row_float


def plot_scatter(path: str, summary: Sequence[dict]) -> None:
    """Mean minimal eps (perturbation tolerance) against mean Spearman (adversarial alignment), one point
    per model with its 95% bootstrap intervals as error bars. The axes follow
    :func:`honest_limits`: eps from 0 (a ratio scale), Spearman over at least 0.5 of its [-1, 1]
    range and four times the widest interval, so a gap inside the intervals never fills the figure."""
    plt = pyplot()

    get = row_float
    swap = [get(r, "cue_swap_accuracy") for r in summary]
    has_swap = any(math.isfinite(v) for v in swap)
    if has_swap:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.0, 4.4), gridspec_kw={"width_ratios": [1.25, 1]})
        plot_cue_swap(bx, summary)
    else:
        fig, ax = plt.subplots(figsize=(6.0, 4.4))
    xs, ys = [], []
    for i, row in enumerate(summary):
        x, y = get(row, "avg_eps"), get(row, "avg_spearman")
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        xe = [[x - get(row, "avg_eps_low")], [get(row, "avg_eps_high") - x]]
        ye = [[y - get(row, "avg_spearman_low")], [get(row, "avg_spearman_high") - y]]
        xe = xe if all(math.isfinite(v[0]) for v in xe) else None
        ye = ye if all(math.isfinite(v[0]) for v in ye) else None
        ax.errorbar([x], [y], xerr=xe, yerr=ye, fmt="o", ms=6, capsize=4, color=f"C{i}", label=row["model"])
        xs.append((x, get(row, "avg_eps_low"), get(row, "avg_eps_high")))
        ys.append((y, get(row, "avg_spearman_low"), get(row, "avg_spearman_high")))
    if xs:
        ax.set_xlim(*honest_limits(*zip(*xs), min_span=0.0, bounds=(0.0, math.inf), include=0.0))
        ax.set_ylim(*honest_limits(*zip(*ys), min_span=0.5, bounds=(-1.0, 1.0)))
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("perturbation tolerance: mean minimal eps (L2), 95% CI")
    ax.set_ylabel("adversarial alignment: mean Spearman, 95% CI")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_cue_swap(ax, summary: Sequence[dict]) -> None:
    """Grouped bars per model: accuracy on the images as they are, with another class's patch colour
    (cue swap) and with the label's own (congruent), in %, from 0, with 95% intervals where known."""
    def get(row, key):
        return 100.0 * row_float(row, key)

    groups = [("as they are", "accuracy"), ("patch of another class", "cue_swap_accuracy"),
              ("patch of the label", "cue_congruent_accuracy")]
    width = 0.8 / len(groups)
    for j, (label, key) in enumerate(groups):
        xs = np.arange(len(summary)) + (j - (len(groups) - 1) / 2) * width
        means = np.array([get(r, key) for r in summary])
        lows, highs = np.array([get(r, f"{key}_low") for r in summary]), np.array([get(r, f"{key}_high") for r in summary])
        ax.bar(xs, np.nan_to_num(means), width, label=label, color=("0.6", "C3", "C2")[j])
        ok = np.isfinite(means) & np.isfinite(lows) & np.isfinite(highs)
        if ok.any():
            ax.errorbar(xs[ok], means[ok], yerr=[means[ok] - lows[ok], highs[ok] - means[ok]], fmt="none",
                        ecolor="black", capsize=3)
    ax.set_xticks(range(len(summary)), [r["model"] for r in summary], rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 120)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_title("reliance on the spurious patch (cue-swap test)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)


def plot_panels(path: str, name: str, panels: Sequence[dict], has_cue: bool = False) -> None:
    plt = pyplot()

    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 4, figsize=(9, 2.3 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels):
        lo, hi = float(p["x"].min()), float(p["x"].max())
        size = p["x"].shape[0]
        row[0].imshow(normalised(p["x"], lo, hi))
        row[0].set_title(f"#{p['img']} label {p['label']}", fontsize=8)
        row[1].imshow(p["heatmap"], cmap="jet")
        row[1].set_title("human map", fontsize=8)
        row[2].imshow(normalised(p["x_adv"], lo, hi))
        row[2].set_title(f"adversarial: {p['pred']} (eps {p['eps']:.3g})", fontsize=8)
        row[3].imshow(p["pmask"], cmap="inferno")
        row[3].set_title(f"|mean perturbation|, rho {p['spearman']:.2f}", fontsize=8)
        for ax in row:
            draw_cue(ax, size, has_cue)
            ax.axis("off")
    fig.suptitle(name + ("  (dashed: the spurious patch cue)" if has_cue else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def plot_models(path: str, named_panels: Sequence[tuple], has_cue: bool = False, max_images: int = 6) -> None:
    """The same images for every model: image, human map, then each model's perturbation mask (its own
    colour scale; ``rho``: Spearman with the human map; ``patch``: share of the mask inside the patch),
    with the patch cue outlined. Images are the first ones (record order) that some model attacked; a
    model that did not attack an image shows an empty cell."""

    def title(name, p, cue):
        return f"{name}\neps {float(p['eps']):.2f}, rho {float(p['spearman']):.2f}{cue}"

    model_grid(path, named_panels, has_cue, max_images, image=lambda p: normalised(p["x"]), map_key="pmask",
               title=title, missing="not attacked",
               suptitle="smallest attacks (|mean perturbation|) next to the human map")
