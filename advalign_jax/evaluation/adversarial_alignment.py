"""The adversarial-alignment evaluation: perturbation tolerance and alignment of the smallest attacks.

For each model and every ClickMe image: the minimal-eps search (:mod:`advalign_jax.attacks.search`),
then the norms of the attack, the Spearman correlation between its perturbation mask and the human
map, and Dice/IoU of their top 10% (the study: serre-lab/Adversarial-Alignment; its columns and
statistics). Output files, all in ``workdir``:

- ``per_image/<model>.csv``: ``model,img,label,pred,eps,l2,linf,spearman`` (the reference's columns;
  ``img`` is the record index) then ``clean_pred,status,dice,iou`` and the cue columns
  ``cue_mass,cue,swap_cue,swap_pred,congruent_pred`` (:mod:`advalign_jax.evaluation.cue_swap`;
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
  images), with their bootstrap intervals and Wilcoxon p-values (:func:`advalign_jax.evaluation.summaries.compare_models`).
- ``tolerance_vs_alignment.png``: mean minimal eps against mean Spearman, one point per model, with
  the 95% intervals as error bars, on axes that do not magnify a gap inside its noise
  (:func:`advalign_jax.evaluation.figures.honest_limits`: the eps axis starts at 0; the Spearman axis spans at least 0.5 and
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

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.attacks.pgd import PGDConfig
from advalign_jax.attacks.search import ReferenceSearch, doubling_search, reference_search
from advalign_jax.errors import ConfigError
from advalign_jax.evaluation import adversarial_alignment_plots as plots
from advalign_jax.evaluation import clickme, cue_swap, metrics
from advalign_jax.evaluation.figures import cue_mask
from advalign_jax.evaluation.summaries import bootstrap_options, with_interval
from advalign_jax.evaluation.tables import format_comparison, format_interval, format_table
from advalign_jax.models import get_model

PER_IMAGE_COLUMNS = ["model", "img", "label", "pred", "eps", "l2", "linf", "spearman",
                     "clean_pred", "status", "dice", "iou", *cue_swap.CUE_COLUMNS]
SUMMARY_COLUMNS = ["model", "num_correct", "avg_eps", "std_eps", "avg_l2", "std_l2", "avg_linf", "std_linf",
                   "avg_spearman", "std_spearman", "num_images", "num_attacked", "num_no_finite_tolerance",
                   "num_undefined_spearman", "avg_dice", "avg_iou", "accuracy", "accuracy_low", "accuracy_high",
                   "avg_eps_low", "avg_eps_high",
                   "avg_spearman_low", "avg_spearman_high", "avg_dice_low", "avg_dice_high", "avg_cue_mass",
                   "avg_cue_mass_low", "avg_cue_mass_high", *cue_swap.CUE_SUMMARY_COLUMNS, "bootstrap_resamples",
                   "wall_time_s"]
# The paired comparisons between models (comparison.csv): per-image value, NaN where undefined.
COMPARISON_METRICS = {
    "eps": lambda r: float(r["eps"]) if r["status"] == "attacked" else float("nan"),
    "spearman": lambda r: float(r["spearman"]) if r["status"] == "attacked" else float("nan"),
    "dice": lambda r: float(r["dice"]) if r["status"] == "attacked" else float("nan"),
    "cue_mass": lambda r: float(r["cue_mass"]) if r["status"] == "attacked" else float("nan"),
    "cue_swap_correct": cue_swap.swap_correct,
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


def search_batch_fn(model, config, attack: PGDConfig, search: ReferenceSearch, has_cue: bool = False):
    """A jitted ``(variables, images, heatmaps, labels, index, mask, variants) -> per-image results`` for
    one model (:class:`advalign_jax.evaluation.clickme.Task`); ``has_cue``: also the share of the perturbation inside the
    synthetic data's patch (``cue_mass``)."""
    domain = config.attack_domain
    norm = model.module.norm if hasattr(model.module, "norm") else None
    attack_model = model
    if domain != "unit":
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


def summarise(name: str, rows: Sequence[dict], wall_time: float, boot: dict | None = None) -> dict:
    """The summary row of one model from its per-image rows (module docstring); ``boot``: the bootstrap
    options (:func:`advalign_jax.evaluation.summaries.bootstrap_options`)."""
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
    with_interval(row, "accuracy", [float(s != "misclassified") for s in status], boot)
    for key, values in (("avg_eps", eps), ("avg_spearman", rho_ok), ("avg_dice", col("dice", attacked)),
                        ("avg_cue_mass", col("cue_mass", attacked))):
        with_interval(row, key, values, boot)
    row.update(cue_swap.cue_summary(rows, boot))
    row["bootstrap_resamples"] = boot["resamples"]
    row["wall_time_s"] = round(wall_time, 3)
    return row


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
               "dice": float(out["dice"][k]), "iou": float(out["iou"][k]), **cue_swap.cue_fields(out, meta, k)}
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


def _rows_fn(config):
    """The per-image rows of a batch, with the config's values read once."""
    group = int(config.minmax_group) if config.attack_domain == "minmax" else 0
    unfooled, gate = config.search.unfooled, float(config.search.gate_eps)

    def rows(name, host, meta, done):
        if group:
            _check_groups(host, meta, group)
        return _rows_from_batch(name, host, meta, done, unfooled, gate)

    return rows


def task(config) -> clickme.Task:
    """The adversarial-alignment evaluation as a :class:`~advalign_jax.evaluation.clickme.Task` (config
    checked first)."""
    attack = attack_config(config)
    search = search_config(config)
    to_attack_domain(jnp.zeros((1, 2, 2, 3)), config.attack_domain, lambda x: x)  # validates the name
    if int(config.minmax_group) < 1:
        raise ConfigError(f"minmax_group must be at least 1, got {config.minmax_group}")
    boot = bootstrap_options(config)
    return clickme.Task(
        per_image_columns=PER_IMAGE_COLUMNS, summary_columns=SUMMARY_COLUMNS,
        batch_fn=lambda model, has_cue: search_batch_fn(model, config, attack, search, has_cue),
        rows=_rows_fn(config),
        summarise=lambda name, rows, seconds: summarise(name, rows, seconds, boot),
        keep_picture=lambda host, k: bool(host["correct"][k] and host["fooled"][k]),
        plot_panels=plots.plot_panels, plot_summary=plots.plot_scatter, summary_figure="tolerance_vs_alignment.png",
        comparison_metrics=COMPARISON_METRICS, plot_models=plots.plot_models, models_figure="perturbations.png")


def evaluate(config, progress: bool = True) -> list[dict]:
    """Runs the evaluation of every model in ``config.models``; returns the summary rows."""
    return clickme.run(config, task(config), progress=progress)


def format_summary(rows: Sequence[dict]) -> str:
    """The main summary columns as a text table (means with their 95% intervals), then the paired
    differences between the models (``rows.comparison``, :class:`~advalign_jax.evaluation.clickme.Summary`) where there are any."""
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
