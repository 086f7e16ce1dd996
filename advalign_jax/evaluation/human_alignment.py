"""The human-alignment score on ClickMe (``advalign-jax evaluate-clickme``).

Per image (Fel et al. 2022, "Harmonizing the object recognition strategies of deep neural networks
with humans"; serre-lab/Harmonization, ``harmonization/evaluation/clickme.py``): the model's saliency
(by default ``|d f_y / d x|`` max over channels, :mod:`advalign_jax.evaluation.saliency`) against the
blurred ClickMe map: Spearman over all pixels (average ranks), Dice and IoU of the top 10% of each map.
Per model: ``human_alignment = mean Spearman / 0.65753`` (the human inter-rater ceiling), with images
whose Spearman is undefined (a constant map) counted and left out of the mean.

Files in ``workdir``: ``per_image/<model>.csv`` (``model,img,label,pred,spearman,dice,iou`` then the
cue columns ``cue_mass,cue,swap_cue,swap_pred,congruent_pred`` of :mod:`advalign_jax.evaluation.cue_swap`;
``cue_mass``: the share of the saliency map inside the synthetic data's patch), ``summary.csv``
(``model,num_images,accuracy,avg_spearman,std_spearman,human_alignment,avg_dice,avg_iou,
num_undefined_spearman,saliency``, then the 95% bootstrap intervals ``accuracy_low,accuracy_high,
avg_spearman_low,avg_spearman_high,human_alignment_low,human_alignment_high,avg_dice_low,
avg_dice_high``, ``avg_cue_mass`` with its interval, the cue-swap test ``cue_swap_accuracy`` (with its
interval), ``cue_congruent_accuracy,cue_follow_rate``, ``bootstrap_resamples,wall_time_s``),
``comparison.csv`` (two models or more: paired differences ``b - a`` of ``spearman``,
``human_alignment``, ``dice``, ``accuracy``, ``cue_mass`` and ``cue_swap_correct`` over the same
images, with bootstrap intervals and Wilcoxon p-values), ``alignment.png`` (score and accuracies per
model with their intervals, on axes from 0), ``saliency.png`` (the same images for every model:
image, human map, each model's saliency, the patch cue outlined) and ``panels/<model>.png`` (image,
human map, saliency). Resumes like ``evaluate``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.errors import ConfigError
from advalign_jax.evaluation import clickme, cue_swap, metrics, saliency
from advalign_jax.evaluation.figures import cue_mask, draw_cue, model_grid, pyplot, save_figure
from advalign_jax.evaluation.summaries import bootstrap_options, mean_std, row_float, with_interval
from advalign_jax.evaluation.tables import format_comparison, format_interval, format_table

HUMAN_CEILING = 0.65753
PER_IMAGE_COLUMNS = ["model", "img", "label", "pred", "spearman", "dice", "iou", *cue_swap.CUE_COLUMNS]
SUMMARY_COLUMNS = ["model", "num_images", "accuracy", "avg_spearman", "std_spearman", "human_alignment",
                   "avg_dice", "avg_iou", "num_undefined_spearman", "saliency", "accuracy_low", "accuracy_high",
                   "avg_spearman_low", "avg_spearman_high", "human_alignment_low", "human_alignment_high",
                   "avg_dice_low", "avg_dice_high", "avg_cue_mass", "avg_cue_mass_low", "avg_cue_mass_high",
                   *cue_swap.CUE_SUMMARY_COLUMNS, "bootstrap_resamples", "wall_time_s"]
COMPARISON_METRICS = {
    "spearman": lambda r: float(r["spearman"]),
    "human_alignment": lambda r: float(r["spearman"]) / HUMAN_CEILING,
    "dice": lambda r: float(r["dice"]),
    "accuracy": lambda r: float(int(r["pred"]) == int(r["label"])),
    "cue_mass": lambda r: float(r["cue_mass"]),
    "cue_swap_correct": cue_swap.swap_correct,
}


def human_alignment_score(mean_spearman: float) -> float:
    """Mean Spearman as a fraction of the human inter-rater ceiling (0.65753)."""
    return mean_spearman / HUMAN_CEILING


def saliency_batch_fn(model, config, has_cue: bool = False):
    """A jitted ``(variables, images, heatmaps, labels, index, mask, variants) -> per-image results``
    (:class:`advalign_jax.evaluation.clickme.Task`); ``has_cue``: also the share of the saliency inside the synthetic data's
    patch (``cue_mass``)."""
    method = saliency.METHODS[config.saliency]
    options = dict(n=int(config.smoothgrad.samples), sigma=float(config.smoothgrad.sigma))

    def fn(variables, images, heatmaps, labels, index, mask, variants):  # pylint: disable=unused-argument
        logits_fn = model.logits_fn(variables)
        sal = method(logits_fn, images, labels, key=jax.random.PRNGKey(config.seed), **options)
        pred = jnp.argmax(logits_fn(images), axis=-1)
        out = {f"pred_{v}": jnp.argmax(logits_fn(im), axis=-1) for v, im in variants.items()}
        if has_cue:
            out["cue_mass"] = metrics.region_fraction(sal, cue_mask(images.shape[1]))
        return {**out, "pred": pred, "spearman": metrics.spearman(sal, heatmaps),
                "dice": metrics.top_fraction_dice(sal, heatmaps), "iou": metrics.top_fraction_iou(sal, heatmaps),
                "picture_image": images, "picture_heatmap": heatmaps, "picture_saliency": sal}

    return jax.jit(fn)


def _rows(name, host, meta, done) -> list[dict]:
    return [{"model": name, "img": int(meta["index"][k]), "label": int(meta["label"][k]),
             "pred": int(host["pred"][k]), "spearman": float(host["spearman"][k]),
             "dice": float(host["dice"][k]), "iou": float(host["iou"][k]), **cue_swap.cue_fields(host, meta, k)}
            for k in np.flatnonzero(meta["mask"]) if int(meta["index"][k]) not in done]


def summarise(name: str, rows: Sequence[dict], seconds: float, method: str = "gradient",
              boot: dict | None = None) -> dict:
    """The summary row of one model (module docstring); ``boot``: :func:`advalign_jax.evaluation.summaries.bootstrap_options`."""
    boot = boot or {"resamples": 10_000, "confidence": 0.95, "seed": 0}
    rho = np.array([float(r["spearman"]) for r in rows], np.float64)
    ok = rho[np.isfinite(rho)]
    avg, std = mean_std(ok)
    row = {"model": name, "num_images": len(rows),
           "accuracy": float(np.mean([int(r["pred"]) == int(r["label"]) for r in rows])) if rows else float("nan"),
           "avg_spearman": avg, "std_spearman": std, "human_alignment": human_alignment_score(avg),
           "avg_dice": mean_std([float(r["dice"]) for r in rows])[0],
           "avg_iou": mean_std([float(r["iou"]) for r in rows])[0],
           "num_undefined_spearman": int(rho.size - ok.size), "saliency": method}
    with_interval(row, "accuracy", [int(r["pred"]) == int(r["label"]) for r in rows], boot)
    with_interval(row, "avg_spearman", ok, boot)
    # the score is the mean Spearman over a constant: its interval is the Spearman interval, scaled
    row["human_alignment_low"] = human_alignment_score(row["avg_spearman_low"])
    row["human_alignment_high"] = human_alignment_score(row["avg_spearman_high"])
    with_interval(row, "avg_dice", [float(r["dice"]) for r in rows], boot)
    with_interval(row, "avg_cue_mass", [float(r["cue_mass"]) for r in rows], boot)
    row.update(cue_swap.cue_summary(rows, boot))
    row["bootstrap_resamples"] = boot["resamples"]
    row["wall_time_s"] = round(seconds, 3)
    return row


def plot_panels(path: str, name: str, panels, has_cue: bool = False) -> None:
    fig, axes = pyplot().subplots(len(panels), 3, figsize=(7, 2.3 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels):
        row[0].imshow(np.clip(p["image"], 0, 1))
        row[0].set_title(f"#{p['img']} label {p['label']} pred {int(p['pred'])}", fontsize=8)
        row[1].imshow(p["heatmap"], cmap="jet")
        row[1].set_title("human map", fontsize=8)
        row[2].imshow(p["saliency"], cmap="inferno")
        row[2].set_title(f"saliency, rho {float(p['spearman']):.2f}", fontsize=8)
        for ax in row:
            draw_cue(ax, p["image"].shape[0], has_cue)
            ax.axis("off")
    fig.suptitle(name + ("  (dashed: the spurious patch cue)" if has_cue else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def plot_models(path: str, named_panels, has_cue: bool = False, max_images: int = 6) -> None:
    """The same images for every model: image, human map, then each model's saliency map (its own
    colour scale; ``rho``: Spearman with the human map), with the patch cue outlined."""
    def title(name, p, cue):
        return f"{name}\npred {int(p['pred'])}, rho {float(p['spearman']):.2f}{cue}"

    model_grid(path, named_panels, has_cue, max_images, image=lambda p: np.clip(p["image"], 0, 1),
               map_key="saliency", title=title, missing=None,
               suptitle="saliency |d logit_y / dx| next to the human map")


def plot_scores(path: str, rows) -> None:
    """Human-alignment score (% of the human ceiling), clean accuracy and cue-swap accuracy per model,
    bars from 0 with 95% bootstrap intervals (a bar chart's axis starts at 0: the gaps are shown at
    their size relative to the values)."""
    plt = pyplot()
    num = row_float
    names = [r["model"] for r in rows]
    panels = [("human alignment (% of ceiling)", "human_alignment", 100.0),
              ("accuracy (%)", "accuracy", 100.0), ("cue-swap accuracy (%)", "cue_swap_accuracy", 100.0)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (title, key, scale) in zip(axes, panels):
        means = np.array([num(r, key) for r in rows]) * scale
        lows = np.array([num(r, f"{key}_low") for r in rows]) * scale
        highs = np.array([num(r, f"{key}_high") for r in rows]) * scale
        err = np.array([np.nan_to_num(means - lows), np.nan_to_num(highs - means)])
        ax.bar(range(len(names)), np.nan_to_num(means), yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=7)
        ax.set_ylim(0, max(100.0, float(np.nanmax(np.append(highs, means), initial=0.0)) * 1.05))
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def task(config) -> clickme.Task:
    if config.saliency not in saliency.METHODS:
        raise ConfigError(f"saliency must be one of {', '.join(saliency.METHODS)}, got {config.saliency!r}")
    if config.smoothgrad.samples < 1 or config.smoothgrad.sigma < 0:
        raise ConfigError("smoothgrad.samples must be at least 1 and smoothgrad.sigma non-negative")
    boot = bootstrap_options(config)
    return clickme.Task(
        per_image_columns=PER_IMAGE_COLUMNS, summary_columns=SUMMARY_COLUMNS,
        batch_fn=lambda model, has_cue: saliency_batch_fn(model, config, has_cue), rows=_rows,
        summarise=lambda name, rows, seconds: summarise(name, rows, seconds, config.saliency, boot),
        keep_picture=lambda host, k: True, plot_panels=plot_panels, plot_summary=plot_scores,
        summary_figure="alignment.png", comparison_metrics=COMPARISON_METRICS, plot_models=plot_models,
        models_figure="saliency.png")


def evaluate(config, progress: bool = True) -> list[dict]:
    return clickme.run(config, task(config), progress=progress)


def format_summary(rows) -> str:
    """The summary as a text table (means with their 95% intervals), then the paired differences between
    the models (``rows.comparison``) where there are any."""
    table = [{"model": r["model"], "images": r["num_images"],
              "accuracy %": format_interval(r, "accuracy", scale=100.0),
              "human alignment %": format_interval(r, "human_alignment", scale=100.0),
              "dice top 10%": format_interval(r, "avg_dice"),
              "saliency on patch %": format_interval(r, "avg_cue_mass", scale=100.0),
              "cue-swap acc %": format_interval(r, "cue_swap_accuracy", scale=100.0), "time_s": r["wall_time_s"]}
             for r in rows]
    text = format_table(table, list(table[0])) if table else ""
    comparison = [c for c in getattr(rows, "comparison", [])
                  if c["metric"] in ("human_alignment", "accuracy", "cue_swap_correct")]
    if comparison:
        text += ("\n\npaired differences on the same images (b - a, mean [95% bootstrap CI], Wilcoxon "
                 "signed-rank p; *: the interval excludes 0; all metrics in comparison.csv)\n"
                 + format_comparison(comparison))
    return text
