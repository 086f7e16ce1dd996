"""The human-alignment score on ClickMe (``advalign-jax evaluate-clickme``).

Per image (``../shared/spec/harmonization.md``, "The human-alignment score"): the model's saliency
(by default ``|d f_y / d x|`` max over channels, :mod:`advalign_jax.evaluation.saliency`) against the
blurred ClickMe map: Spearman over all pixels (average ranks), Dice and IoU of the top 10% of each map.
Per model: ``human_alignment = mean Spearman / 0.65753`` (the human inter-rater ceiling), with images
whose Spearman is undefined (a constant map) counted and left out of the mean.

Files in ``workdir``: ``per_image/<model>.csv`` (``model,img,label,pred,spearman,dice,iou``),
``summary.csv`` (``model,num_images,accuracy,avg_spearman,std_spearman,human_alignment,avg_dice,
avg_iou,num_undefined_spearman,saliency,wall_time_s``), ``alignment.png`` (score per model) and
``panels/<model>.png`` (image, human map, saliency). Resumes like ``evaluate``.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.errors import ConfigError
from advalign_jax.evaluation import metrics, runner, saliency
from advalign_jax.evaluation.results import format_table

HUMAN_CEILING = 0.65753
PER_IMAGE_COLUMNS = ["model", "img", "label", "pred", "spearman", "dice", "iou"]
SUMMARY_COLUMNS = ["model", "num_images", "accuracy", "avg_spearman", "std_spearman", "human_alignment",
                   "avg_dice", "avg_iou", "num_undefined_spearman", "saliency", "wall_time_s"]
RESULT_KEYS = ("data", "saliency", "smoothgrad", "dtype", "max_images", "seed")


def human_alignment_score(mean_spearman: float) -> float:
    """Mean Spearman as a fraction of the human inter-rater ceiling (0.65753)."""
    return mean_spearman / HUMAN_CEILING


def make_batch_fn(model, config):
    method = saliency.METHODS[config.saliency]
    options = dict(n=int(config.smoothgrad.samples), sigma=float(config.smoothgrad.sigma))

    def fn(variables, images, heatmaps, labels, index, mask):  # pylint: disable=unused-argument
        logits_fn = model.logits_fn(variables)
        sal = method(logits_fn, images, labels, key=jax.random.PRNGKey(config.seed), **options)
        pred = jnp.argmax(logits_fn(images), axis=-1)
        return {"pred": pred, "spearman": metrics.spearman(sal, heatmaps),
                "dice": metrics.top_fraction_dice(sal, heatmaps), "iou": metrics.top_fraction_iou(sal, heatmaps),
                "picture_image": images, "picture_heatmap": heatmaps, "picture_saliency": sal}

    return jax.jit(fn)


def _rows(name, host, meta, done) -> list[dict]:
    return [{"model": name, "img": int(meta["index"][k]), "label": int(meta["label"][k]),
             "pred": int(host["pred"][k]), "spearman": float(host["spearman"][k]),
             "dice": float(host["dice"][k]), "iou": float(host["iou"][k])}
            for k in np.flatnonzero(meta["mask"]) if int(meta["index"][k]) not in done]


def summarise(name: str, rows: Sequence[dict], seconds: float, method: str = "gradient") -> dict:
    rho = np.array([float(r["spearman"]) for r in rows], np.float64)
    ok = rho[np.isfinite(rho)]
    avg, std = runner.mean_std(ok)
    return {"model": name, "num_images": len(rows),
            "accuracy": float(np.mean([int(r["pred"]) == int(r["label"]) for r in rows])) if rows else float("nan"),
            "avg_spearman": avg, "std_spearman": std, "human_alignment": human_alignment_score(avg),
            "avg_dice": runner.mean_std([float(r["dice"]) for r in rows])[0],
            "avg_iou": runner.mean_std([float(r["iou"]) for r in rows])[0],
            "num_undefined_spearman": int(rho.size - ok.size), "saliency": method, "wall_time_s": round(seconds, 3)}


def plot_panels(path: str, name: str, panels) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(len(panels), 3, figsize=(7, 2.3 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels):
        row[0].imshow(np.clip(p["image"], 0, 1))
        row[0].set_title(f"#{p['img']} label {p['label']} pred {int(p['pred'])}", fontsize=8)
        row[1].imshow(p["heatmap"], cmap="jet")
        row[1].set_title("human map", fontsize=8)
        row[2].imshow(p["saliency"], cmap="inferno")
        row[2].set_title(f"saliency, rho {float(p['spearman']):.2f}", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    runner.save_figure(fig, path, dpi=90)


def plot_scores(path: str, rows) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    names = [r["model"] for r in rows]
    ax.bar(names, [100 * float(r["human_alignment"]) for r in rows])
    ax.set_ylabel("human alignment (% of the human ceiling)")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    runner.save_figure(fig, path, dpi=100)


def task(config) -> runner.Task:
    if config.saliency not in saliency.METHODS:
        raise ConfigError(f"saliency must be one of {', '.join(saliency.METHODS)}, got {config.saliency!r}")
    if config.smoothgrad.samples < 1 or config.smoothgrad.sigma < 0:
        raise ConfigError("smoothgrad.samples must be at least 1 and smoothgrad.sigma non-negative")
    return runner.Task(
        result_keys=RESULT_KEYS, per_image_columns=PER_IMAGE_COLUMNS, summary_columns=SUMMARY_COLUMNS,
        make_batch_fn=lambda model: make_batch_fn(model, config), rows=_rows,
        summarise=lambda name, rows, seconds: summarise(name, rows, seconds, config.saliency),
        keep_picture=lambda host, k: True, plot_panels=plot_panels,
        plot_summary=lambda workdir, rows, changed: runner.replot(os.path.join(workdir, "alignment.png"), changed,
                                                                 lambda path: plot_scores(path, rows)))


def evaluate(config, progress: bool = True) -> list[dict]:
    return runner.run(config, task(config), progress=progress)


def format_summary(rows) -> str:
    return format_table(rows, ["model", "num_images", "accuracy", "avg_spearman", "human_alignment", "avg_dice",
                               "avg_iou", "num_undefined_spearman", "wall_time_s"])
