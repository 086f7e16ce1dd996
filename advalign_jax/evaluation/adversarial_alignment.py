"""The adversarial-alignment evaluation: perturbation tolerance and alignment of the smallest attacks.

For each model and every ClickMe image: the minimal-eps search (:mod:`advalign_jax.attacks.search`),
then the norms of the attack, the Spearman correlation between its perturbation mask and the human
map, and Dice/IoU of their top 10%. Output files (``../shared/spec/adversarial_alignment.md``), all
in ``workdir``:

- ``per_image/<model>.csv``: ``model,img,label,pred,eps,l2,linf,spearman`` (the reference's columns;
  ``img`` is the record index) then ``clean_pred,status,dice,iou`` and the cue columns
  ``cue_mass,cue,swap_cue,swap_pred,congruent_pred`` (:mod:`advalign_jax.evaluation.runner`;
  ``cue_mass``: the share of the perturbation mask inside the synthetic data's patch). ``status`` is
  ``attacked``, ``misclassified`` (skipped, as in the reference) or ``no_finite_tolerance`` (not
  fooled at the gate radius). Undefined Spearman values (a constant map) are written as ``nan``.
- ``summary.csv``: ``model,num_correct,avg_eps,std_eps,avg_l2,std_l2,avg_linf,std_linf,avg_spearman,
  std_spearman`` (means and population standard deviations over the attacked images, Spearman over
  the attacked images where it is defined) then ``num_images,num_attacked,num_no_finite_tolerance,
  num_undefined_spearman,avg_dice,avg_iou``, the clean ``accuracy`` and the 95% bootstrap intervals
  ``accuracy_low,accuracy_high,avg_eps_low,avg_eps_high,
  avg_spearman_low,avg_spearman_high,avg_dice_low,avg_dice_high``, ``avg_cue_mass`` with its interval,
  the cue-swap test ``cue_swap_accuracy`` (with its interval), ``cue_congruent_accuracy,
  cue_follow_rate``, then ``bootstrap_resamples,wall_time_s``.
- ``comparison.csv`` (two models or more): paired differences ``b - a`` of ``eps``, ``spearman``,
  ``dice``, ``cue_mass`` (over the images both models attacked) and ``cue_swap_correct`` (over all
  images), with their bootstrap intervals and Wilcoxon p-values (:func:`runner.compare_models`).
- ``tolerance_vs_alignment.png``: mean minimal eps against mean Spearman, one point per model, with
  the 95% intervals as error bars, on axes that do not magnify a gap inside its noise
  (:func:`runner.honest_limits`: the eps axis starts at 0; the Spearman axis spans at least 0.5 and
  four times the widest interval); beside it, where the cue-swap test ran, each model's accuracy on
  the images as they are, with the patch of another class and with the label's own patch (bars
  from 0, 95% intervals).
- ``perturbations.png``: the same images for every model: the image and its human map, then each
  model's perturbation mask, with the patch cue's square drawn where the data has one.
- ``panels/<model>.png``: image, human map, adversarial image and perturbation map of a few images.
- ``config.json``: the configuration that produced the results.

Results are written batch by batch; a rerun with the same configuration resumes where the last one
stopped and ends with the same files and no duplicate rows. Batches are global arrays sharded over
the data axis of the mesh; every process computes, process 0 writes.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.attacks.pgd import PGDConfig
from advalign_jax.attacks.search import ReferenceSearch, doubling_search, reference_search
from advalign_jax.errors import ConfigError
from advalign_jax.evaluation import metrics, runner
from advalign_jax.evaluation.runner import format_comparison, format_interval, format_table

PER_IMAGE_COLUMNS = ["model", "img", "label", "pred", "eps", "l2", "linf", "spearman",
                     "clean_pred", "status", "dice", "iou", *runner.CUE_COLUMNS]
SUMMARY_COLUMNS = ["model", "num_correct", "avg_eps", "std_eps", "avg_l2", "std_l2", "avg_linf", "std_linf",
                   "avg_spearman", "std_spearman", "num_images", "num_attacked", "num_no_finite_tolerance",
                   "num_undefined_spearman", "avg_dice", "avg_iou", "accuracy", "accuracy_low", "accuracy_high",
                   "avg_eps_low", "avg_eps_high",
                   "avg_spearman_low", "avg_spearman_high", "avg_dice_low", "avg_dice_high", "avg_cue_mass",
                   "avg_cue_mass_low", "avg_cue_mass_high", *runner.CUE_SUMMARY_COLUMNS, "bootstrap_resamples",
                   "wall_time_s"]
# Config keys whose values decide the results (a resumed run must agree on them).
RESULT_KEYS = ("data", "attack", "search", "attack_domain", "minmax_group", "resize_to_model", "resize_method",
               "dtype", "max_images", "seed", "cue_swap")
# The paired comparisons between models (comparison.csv): per-image value, NaN where undefined.
COMPARISON_METRICS = {
    "eps": lambda r: float(r["eps"]) if r["status"] == "attacked" else float("nan"),
    "spearman": lambda r: float(r["spearman"]) if r["status"] == "attacked" else float("nan"),
    "dice": lambda r: float(r["dice"]) if r["status"] == "attacked" else float("nan"),
    "cue_mass": lambda r: float(r["cue_mass"]) if r["status"] == "attacked" else float("nan"),
    "cue_swap_correct": runner.swap_correct,
}


def attack_config(c) -> PGDConfig:
    """PGDConfig from the ``attack`` block; bad values -> one line naming the key."""
    a = c.attack
    if a.steps < 1:
        raise ConfigError(f"attack.steps must be at least 1, got {a.steps}")
    if a.step_size <= 0:
        raise ConfigError(f"attack.step_size must be positive, got {a.step_size}")
    try:
        return PGDConfig(norm=a.norm, steps=int(a.steps), step_size=float(a.step_size),
                         relative_step=bool(a.relative_step), projection=a.projection,
                         random_start=a.random_start, loss=a.loss,
                         clip=None if a.clip is None or len(a.clip) == 0 else tuple(float(v) for v in a.clip))
    except ValueError as err:
        raise ConfigError(f"attack: {err}") from None


def search_config(c) -> ReferenceSearch:
    s = c.search
    if s.kind not in ("reference", "doubling"):
        raise ConfigError(f"search.kind must be 'reference' or 'doubling', got {s.kind!r}")
    if s.unfooled not in ("drop", "record"):
        raise ConfigError(f"search.unfooled must be 'drop' or 'record', got {s.unfooled!r}")
    for key in ("gate_eps", "split_eps", "low", "eps0"):
        if s[key] <= 0:
            raise ConfigError(f"search.{key} (an attack radius) must be positive, got {s[key]}")
    try:
        return ReferenceSearch(gate_eps=float(s.gate_eps), split_eps=float(s.split_eps), low=float(s.low),
                               low_width=float(s.low_width), high_width=float(s.high_width))
    except ValueError as err:
        raise ConfigError(f"search: {err}") from None


# ----------------------------------------------------------------------------------------------------
# The compiled per-batch evaluation
# ----------------------------------------------------------------------------------------------------


def group_minmax(x, group_ids):
    """``(x - lo_g) / (hi_g - lo_g)`` per image, where ``lo_g`` / ``hi_g`` are the minimum and maximum
    over every pixel and channel of all images sharing the image's group id: the study's PyTorch
    notebook min-maxed each batch it read as a whole (``imgs - imgs.min(); imgs / imgs.max()``,
    batches of 2 records). Distinct ids give per-image min-max. A constant group maps to 0."""
    lo = jnp.min(x, axis=(1, 2, 3))
    hi = jnp.max(x, axis=(1, 2, 3))
    same = group_ids[:, None] == group_ids[None, :]
    lo = jnp.min(jnp.where(same, lo[None, :], jnp.inf), axis=1)[:, None, None, None]
    hi = jnp.max(jnp.where(same, hi[None, :], -jnp.inf), axis=1)[:, None, None, None]
    return (x - lo) / jnp.maximum(hi - lo, 1e-12)


def minmax_groups(index, mask, group: int):
    """Group ids of :func:`group_minmax`: ``index // group`` for real images, a distinct negative id for
    each padded one."""
    return jnp.where(mask, index // group, -1 - jnp.arange(index.shape[0], dtype=index.dtype))


def to_attack_domain(x, domain: str, norm, groups=None):
    """Images in [0, 1] -> the space the attack works in (see the config's ``attack_domain``);
    ``groups``: the min-max group of each image (``'minmax'``; default: each image its own)."""
    if domain == "unit":
        return x
    if domain == "minmax":  # as the PyTorch reference fed its models: groups of records min-maxed together
        return group_minmax(x, jnp.arange(x.shape[0]) if groups is None else groups)
    if domain == "standardized":  # the TensorFlow reference attacked the normalised input
        return norm(x)
    raise ConfigError(f"attack_domain must be 'unit', 'minmax' or 'standardized', got {domain!r}")


def make_batch_fn(model, config, attack: PGDConfig, search: ReferenceSearch, has_cue: bool = False):
    """A jitted ``(variables, images, heatmaps, labels, index, mask, variants) -> per-image results`` for
    one model (:class:`runner.Task`); ``has_cue``: also the share of the perturbation inside the
    synthetic data's patch (``cue_mass``)."""
    domain = config.attack_domain
    norm = model.module.norm if hasattr(model.module, "norm") else None
    attack_model = model
    if domain != "unit":
        from advalign_jax.models import get_model  # pylint: disable=import-outside-toplevel

        attack_model = get_model(model.name, **{**model.options, "norm": "none"})
    s = config.search

    group = int(config.minmax_group)

    def resized(images):
        if config.resize_to_model and images.shape[1:3] != tuple(model.input_shape[:2]):
            size = model.input_shape[:2]
            return jax.image.resize(images, (images.shape[0], *size, *images.shape[3:]), method=config.resize_method)
        return images

    def fn(variables, images, heatmaps, labels, index, mask, variants):
        images, heatmaps = resized(images), resized(heatmaps)
        groups = minmax_groups(index, mask, group)
        x = to_attack_domain(images, domain, norm, groups)
        logits_fn = attack_model.logits_fn(variables)
        extra = {f"pred_{v}": jnp.argmax(logits_fn(to_attack_domain(resized(im), domain, norm, groups)), axis=-1)
                 for v, im in variants.items()}
        if s.kind == "reference":
            out = reference_search(logits_fn, x, labels, attack, search, key=jax.random.PRNGKey(config.seed))
        else:
            out = doubling_search(logits_fn, x, labels, attack, eps0=s.eps0, max_doublings=s.max_doublings,
                                  steps=s.bisection_steps, key=jax.random.PRNGKey(config.seed))
        d = out["x_adv"] - x
        pmask = metrics.perturbation_mask(out["x_adv"], x)
        if has_cue:
            extra["cue_mass"] = metrics.region_fraction(pmask, cue_mask(x.shape[1]))
        return {
            **extra,
            "clean_pred": out["clean_pred"], "correct": out["correct"], "fooled": out["fooled"],
            "eps": out["eps"], "pred": out["pred"], "l2": metrics.l2_norm(d), "linf": metrics.linf_norm(d),
            "spearman": metrics.spearman(pmask, heatmaps),
            "dice": metrics.top_fraction_dice(pmask, heatmaps), "iou": metrics.top_fraction_iou(pmask, heatmaps),
            "group_size": jnp.sum(groups[:, None] == groups[None, :], axis=1),
            "picture_x": x, "picture_x_adv": out["x_adv"], "picture_heatmap": heatmaps, "picture_pmask": pmask,
        }

    return jax.jit(fn)


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def cue_mask(size: int) -> np.ndarray:
    """(size, size) 0/1: the synthetic data's patch cue at this image size."""
    from advalign_jax.data.synthetic import cue_region  # pylint: disable=import-outside-toplevel

    m = np.zeros((size, size), np.float32)
    m[cue_region(size)] = 1.0
    return m


def summarise(name: str, rows: Sequence[dict], wall_time: float, boot: dict | None = None) -> dict:
    """The summary row of one model from its per-image rows (module docstring); ``boot``: the bootstrap
    options (:func:`runner.bootstrap_options`)."""
    boot = boot or {"resamples": 10_000, "confidence": 0.95, "seed": 0}
    status = [r["status"] for r in rows]
    attacked = [r for r in rows if r["status"] == "attacked"]

    def col(key, subset):
        return np.array([float(r[key]) for r in subset], np.float64)

    eps, l2, linf = col("eps", attacked), col("l2", attacked), col("linf", attacked)
    rho = col("spearman", attacked)
    rho_ok = rho[np.isfinite(rho)]

    def mean(a):
        return float(np.mean(a)) if a.size else float("nan")

    def std(a):
        return float(np.std(a)) if a.size else float("nan")

    row = {
        "model": name, "num_correct": sum(s != "misclassified" for s in status),
        "avg_eps": mean(eps), "std_eps": std(eps), "avg_l2": mean(l2), "std_l2": std(l2),
        "avg_linf": mean(linf), "std_linf": std(linf), "avg_spearman": mean(rho_ok), "std_spearman": std(rho_ok),
        "num_images": len(rows), "num_attacked": len(attacked),
        "num_no_finite_tolerance": status.count("no_finite_tolerance"),
        "num_undefined_spearman": int(rho.size - rho_ok.size),
        "avg_dice": mean(col("dice", attacked)), "avg_iou": mean(col("iou", attacked)),
    }
    runner.with_interval(row, "accuracy", [float(s != "misclassified") for s in status], boot)
    for key, values in (("avg_eps", eps), ("avg_spearman", rho_ok), ("avg_dice", col("dice", attacked)),
                        ("avg_cue_mass", col("cue_mass", attacked))):
        runner.with_interval(row, key, values, boot)
    row.update(runner.cue_summary(rows, boot))
    row["bootstrap_resamples"] = boot["resamples"]
    row["wall_time_s"] = round(wall_time, 3)
    return row


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def plot_scatter(path: str, summary: Sequence[dict]) -> None:
    """Mean minimal eps (perturbation tolerance) against mean Spearman (adversarial alignment), one point
    per model with its 95% bootstrap intervals as error bars. The axes follow
    :func:`runner.honest_limits`: eps from 0 (a ratio scale), Spearman over at least 0.5 of its [-1, 1]
    range and four times the widest interval, so a gap inside the intervals never fills the figure."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    get = runner.row_float
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
        ax.set_xlim(*runner.honest_limits(*zip(*xs), min_span=0.0, bounds=(0.0, math.inf), include=0.0))
        ax.set_ylim(*runner.honest_limits(*zip(*ys), min_span=0.5, bounds=(-1.0, 1.0)))
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("perturbation tolerance: mean minimal eps (L2), 95% CI")
    ax.set_ylabel("adversarial alignment: mean Spearman, 95% CI")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    runner.save_figure(fig, path, dpi=110)


def plot_cue_swap(ax, summary: Sequence[dict]) -> None:
    """Grouped bars per model: accuracy on the images as they are, with another class's patch colour
    (cue swap) and with the label's own (congruent), in %, from 0, with 95% intervals where known."""
    def get(row, key):
        return 100.0 * runner.row_float(row, key)

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


def _show(im, lo=None, hi=None):
    lo = float(im.min()) if lo is None else lo
    hi = float(im.max()) if hi is None else hi
    return np.clip((im - lo) / max(hi - lo, 1e-12), 0, 1)


def draw_cue(ax, size: int, has_cue: bool) -> None:
    """Outlines the synthetic data's patch cue on an image axis of side ``size``."""
    if not has_cue:
        return
    import matplotlib.patches as mpatches  # pylint: disable=import-outside-toplevel
    from advalign_jax.data.synthetic import cue_region  # pylint: disable=import-outside-toplevel

    rows, _ = cue_region(size)
    ax.add_patch(mpatches.Rectangle((rows.start - 0.5, rows.start - 0.5), rows.stop - rows.start,
                                    rows.stop - rows.start, fill=False, edgecolor="white", lw=1.2, ls="--"))


def plot_panels(path: str, name: str, panels: Sequence[dict], has_cue: bool = False) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 4, figsize=(9, 2.3 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels):
        lo, hi = float(p["x"].min()), float(p["x"].max())
        size = p["x"].shape[0]
        row[0].imshow(_show(p["x"], lo, hi))
        row[0].set_title(f"#{p['img']} label {p['label']}", fontsize=8)
        row[1].imshow(p["heatmap"], cmap="jet")
        row[1].set_title("human map", fontsize=8)
        row[2].imshow(_show(p["x_adv"], lo, hi))
        row[2].set_title(f"adversarial: {p['pred']} (eps {p['eps']:.3g})", fontsize=8)
        row[3].imshow(p["pmask"], cmap="inferno")
        row[3].set_title(f"|mean perturbation|, rho {p['spearman']:.2f}", fontsize=8)
        for ax in row:
            draw_cue(ax, size, has_cue)
            ax.axis("off")
    fig.suptitle(name + ("  (dashed: the spurious patch cue)" if has_cue else ""), fontsize=10)
    fig.tight_layout()
    runner.save_figure(fig, path, dpi=90)


def plot_models(path: str, named_panels: Sequence[tuple], has_cue: bool = False, max_images: int = 6) -> None:
    """The same images for every model: image, human map, then each model's perturbation mask (its own
    colour scale; ``rho``: Spearman with the human map; ``patch``: share of the mask inside the patch),
    with the patch cue outlined. Images are the first ones (record order) that some model attacked; a
    model that did not attack an image shows an empty cell."""

    def title(name, p, cue):
        return f"{name}\neps {float(p['eps']):.2f}, rho {float(p['spearman']):.2f}{cue}"

    model_grid(path, named_panels, has_cue, max_images, image=lambda p: _show(p["x"]), map_key="pmask",
               title=title, missing="not attacked",
               suptitle="smallest attacks (|mean perturbation|) next to the human map")


def model_grid(path: str, named_panels: Sequence[tuple], has_cue: bool, max_images: int, image: Callable,
               map_key: str, title: Callable, missing: Optional[str], suptitle: str) -> None:
    """A figure with one row per image (the first ``max_images`` record indices that any model has a
    panel for) and the columns image, human map, then each model's ``panel[map_key]`` titled
    ``title(name, panel, cue_text)`` (``missing`` where the model has no panel for the image), the
    patch cue outlined when ``has_cue``. ``image(panel)`` gives the RGB image to show."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

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
    runner.save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


def _check_groups(out: dict, meta: dict, group: int) -> None:
    """Every min-max group in a batch is whole (else the images were min-maxed with fewer partners than
    the study's): only the last group of the data may be short."""
    last = (int(meta["num_records"]) - 1) // group
    for k in np.flatnonzero(meta["mask"]):
        img = int(meta["index"][k])
        if int(out["group_size"][k]) < group and img // group != last:
            raise ConfigError(f"attack_domain 'minmax': record {img} was read without the other records of "
                              f"its group of {group} (minmax_group); use a data.batch_size that is a multiple "
                              f"of {group} per process, or minmax_group=1")


def _rows_from_batch(name: str, out: dict, meta: dict, done: set, unfooled: str, gate: float) -> list[dict]:
    rows = []
    attack_keys = ("eps", "l2", "linf", "spearman", "dice", "iou", "cue_mass")
    for k in np.flatnonzero(meta["mask"]):
        img = int(meta["index"][k])
        if img in done:
            continue
        correct, fooled = bool(out["correct"][k]), bool(out["fooled"][k])
        row = {"model": name, "img": img, "label": int(meta["label"][k]), "clean_pred": int(out["clean_pred"][k]),
               "pred": int(out["pred"][k]), "eps": float(out["eps"][k]), "l2": float(out["l2"][k]),
               "linf": float(out["linf"][k]), "spearman": float(out["spearman"][k]),
               "dice": float(out["dice"][k]), "iou": float(out["iou"][k]), **runner.cue_fields(out, meta, k)}
        if not correct:
            row.update(status="misclassified", pred=row["clean_pred"])
            for key in attack_keys:
                row[key] = float("nan")
        elif not fooled and unfooled == "drop":
            row["status"] = "no_finite_tolerance"
            for key in attack_keys:
                row[key] = float("nan")
        else:
            row["status"] = "attacked"
            if not fooled:
                row["eps"] = gate
        rows.append(row)
    return rows


def _rows(config, name, host, meta, done):
    if config.attack_domain == "minmax":
        _check_groups(host, meta, int(config.minmax_group))
    return _rows_from_batch(name, host, meta, done, config.search.unfooled, float(config.search.gate_eps))


def task(config) -> runner.Task:
    """The adversarial-alignment evaluation as a :class:`runner.Task` (config checked first)."""
    attack = attack_config(config)
    search = search_config(config)
    to_attack_domain(jnp.zeros((1, 2, 2, 3)), config.attack_domain, lambda x: x)  # validates the name
    if int(config.minmax_group) < 1:
        raise ConfigError(f"minmax_group must be at least 1, got {config.minmax_group}")
    boot = runner.bootstrap_options(config)
    return runner.Task(
        result_keys=RESULT_KEYS, per_image_columns=PER_IMAGE_COLUMNS, summary_columns=SUMMARY_COLUMNS,
        make_batch_fn=lambda model, has_cue: make_batch_fn(model, config, attack, search, has_cue),
        rows=lambda name, host, meta, done: _rows(config, name, host, meta, done),
        summarise=lambda name, rows, seconds: summarise(name, rows, seconds, boot),
        keep_picture=lambda host, k: bool(host["correct"][k] and host["fooled"][k]),
        plot_panels=plot_panels,
        plot_summary=lambda workdir, rows, changed: runner.replot(
            os.path.join(workdir, "tolerance_vs_alignment.png"), changed, lambda path: plot_scatter(path, rows)),
        comparison_metrics=COMPARISON_METRICS, plot_models=plot_models, models_figure="perturbations.png")


def evaluate(config, progress: bool = True) -> list[dict]:
    """Runs the evaluation of every model in ``config.models``; returns the summary rows."""
    return runner.run(config, task(config), progress=progress)


def format_summary(rows: Sequence[dict]) -> str:
    """The main summary columns as a text table (means with their 95% intervals), then the paired
    differences between the models (``rows.comparison``, :class:`runner.Summary`) where there are any."""
    table = []
    for r in rows:
        table.append({"model": r["model"], "correct": f"{r['num_correct']}/{r['num_images']}",
                      "attacked": r["num_attacked"],
                      "min eps (L2)": format_interval(r, "avg_eps"),
                      "spearman(attack, human)": format_interval(r, "avg_spearman"),
                      "attack on patch %": format_interval(r, "avg_cue_mass", scale=100.0),
                      "cue-swap acc %": format_interval(r, "cue_swap_accuracy", scale=100.0),
                      "time_s": r["wall_time_s"]})
    text = format_table(table, list(table[0])) if table else ""
    comparison = [c for c in getattr(rows, "comparison", [])
                  if c["metric"] in ("cue_swap_correct", "spearman", "eps", "cue_mass")]
    if comparison:
        text += ("\n\npaired differences on the same images (b - a, mean [95% bootstrap CI], Wilcoxon "
                 "signed-rank p; *: the interval excludes 0; all metrics in comparison.csv)\n" + format_comparison(comparison))
    return text
