"""The adversarial-alignment evaluation: perturbation tolerance and alignment of the smallest attacks.

For each model and every ClickMe image: the minimal-eps search (:mod:`advalign_jax.attacks.search`),
then the norms of the attack, the Spearman correlation between its perturbation mask and the human
map, and Dice/IoU of their top 10%. Output files (``../shared/spec/adversarial_alignment.md``), all
in ``workdir``:

- ``per_image/<model>.csv``: ``model,img,label,pred,eps,l2,linf,spearman`` (the reference's columns;
  ``img`` is the record index) then ``clean_pred,status,dice,iou``. ``status`` is ``attacked``,
  ``misclassified`` (skipped, as in the reference) or ``no_finite_tolerance`` (not fooled at the gate
  radius). Undefined Spearman values (a constant map) are written as ``nan``.
- ``summary.csv``: ``model,num_correct,avg_eps,std_eps,avg_l2,std_l2,avg_linf,std_linf,avg_spearman,
  std_spearman`` (means and population standard deviations over the attacked images, Spearman over
  the attacked images where it is defined) then ``num_images,num_attacked,num_no_finite_tolerance,
  num_undefined_spearman,avg_dice,avg_iou,wall_time_s``.
- ``tolerance_vs_alignment.png``: mean L2 of the attacks against mean Spearman, one point per model.
- ``panels/<model>.png``: image, human map, adversarial image and perturbation map of a few images.
- ``config.json``: the configuration that produced the results.

Results are written batch by batch; a rerun with the same configuration resumes where the last one
stopped and ends with the same files and no duplicate rows. Batches are global arrays sharded over
the data axis of the mesh; every process computes, process 0 writes.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.attacks.pgd import PGDConfig
from advalign_jax.attacks.search import ReferenceSearch, doubling_search, reference_search
from advalign_jax.errors import ConfigError
from advalign_jax.evaluation import metrics, runner
from advalign_jax.evaluation.results import format_table

PER_IMAGE_COLUMNS = ["model", "img", "label", "pred", "eps", "l2", "linf", "spearman",
                     "clean_pred", "status", "dice", "iou"]
SUMMARY_COLUMNS = ["model", "num_correct", "avg_eps", "std_eps", "avg_l2", "std_l2", "avg_linf", "std_linf",
                   "avg_spearman", "std_spearman", "num_images", "num_attacked", "num_no_finite_tolerance",
                   "num_undefined_spearman", "avg_dice", "avg_iou", "wall_time_s"]
# Config keys whose values decide the results (a resumed run must agree on them).
RESULT_KEYS = ("data", "attack", "search", "attack_domain", "minmax_group", "resize_to_model", "resize_method",
               "dtype", "max_images", "seed")


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


def make_batch_fn(model, config, attack: PGDConfig, search: ReferenceSearch):
    """A jitted ``(variables, images, heatmaps, labels, index, mask) -> per-image results`` for one model."""
    domain = config.attack_domain
    norm = model.module.norm if hasattr(model.module, "norm") else None
    attack_model = model
    if domain != "unit":
        from advalign_jax.models import get_model  # pylint: disable=import-outside-toplevel

        attack_model = get_model(model.name, **{**model.options, "norm": "none"})
    s = config.search

    group = int(config.minmax_group)

    def fn(variables, images, heatmaps, labels, index, mask):
        if config.resize_to_model and images.shape[1:3] != tuple(model.input_shape[:2]):
            size = model.input_shape[:2]
            images = jax.image.resize(images, (images.shape[0], *size, 3), method=config.resize_method)
            heatmaps = jax.image.resize(heatmaps, (heatmaps.shape[0], *size), method=config.resize_method)
        groups = minmax_groups(index, mask, group)
        x = to_attack_domain(images, domain, norm, groups)
        logits_fn = attack_model.logits_fn(variables)
        if s.kind == "reference":
            out = reference_search(logits_fn, x, labels, attack, search, key=jax.random.PRNGKey(config.seed))
        else:
            out = doubling_search(logits_fn, x, labels, attack, eps0=s.eps0, max_doublings=s.max_doublings,
                                  steps=s.bisection_steps, key=jax.random.PRNGKey(config.seed))
        d = out["x_adv"] - x
        pmask = metrics.perturbation_mask(out["x_adv"], x)
        return {
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


def summarise(name: str, rows: Sequence[dict], wall_time: float) -> dict:
    """The summary row of one model from its per-image rows (module docstring)."""
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

    return {
        "model": name, "num_correct": sum(s != "misclassified" for s in status),
        "avg_eps": mean(eps), "std_eps": std(eps), "avg_l2": mean(l2), "std_l2": std(l2),
        "avg_linf": mean(linf), "std_linf": std(linf), "avg_spearman": mean(rho_ok), "std_spearman": std(rho_ok),
        "num_images": len(rows), "num_attacked": len(attacked),
        "num_no_finite_tolerance": status.count("no_finite_tolerance"),
        "num_undefined_spearman": int(rho.size - rho_ok.size),
        "avg_dice": mean(col("dice", attacked)), "avg_iou": mean(col("iou", attacked)),
        "wall_time_s": round(wall_time, 3),
    }


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def plot_scatter(path: str, summary: Sequence[dict]) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for row in summary:
        x, y = float(row["avg_l2"]), float(row["avg_spearman"])
        if math.isfinite(x) and math.isfinite(y):
            ax.scatter([x], [y], s=40)
            ax.annotate(row["model"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("perturbation tolerance (mean L2 of the smallest attack)")
    ax.set_ylabel("adversarial alignment (mean Spearman)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    runner.save_figure(fig, path, dpi=110)


def plot_panels(path: str, name: str, panels: Sequence[dict]) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 4, figsize=(9, 2.3 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels):
        lo, hi = float(p["x"].min()), float(p["x"].max())
        show = lambda im: np.clip((im - lo) / max(hi - lo, 1e-12), 0, 1)  # noqa: E731
        row[0].imshow(show(p["x"]))
        row[0].set_title(f"#{p['img']} label {p['label']}", fontsize=8)
        row[1].imshow(p["heatmap"], cmap="jet")
        row[1].set_title("human map", fontsize=8)
        row[2].imshow(show(p["x_adv"]))
        row[2].set_title(f"adversarial: {p['pred']} (eps {p['eps']:.3g})", fontsize=8)
        row[3].imshow(p["pmask"], cmap="inferno")
        row[3].set_title(f"|mean perturbation|, rho {p['spearman']:.2f}", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.suptitle(name, fontsize=10)
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
    for k in np.flatnonzero(meta["mask"]):
        img = int(meta["index"][k])
        if img in done:
            continue
        correct, fooled = bool(out["correct"][k]), bool(out["fooled"][k])
        row = {"model": name, "img": img, "label": int(meta["label"][k]), "clean_pred": int(out["clean_pred"][k]),
               "pred": int(out["pred"][k]), "eps": float(out["eps"][k]), "l2": float(out["l2"][k]),
               "linf": float(out["linf"][k]), "spearman": float(out["spearman"][k]),
               "dice": float(out["dice"][k]), "iou": float(out["iou"][k])}
        if not correct:
            row.update(status="misclassified", pred=row["clean_pred"])
            for key in ("eps", "l2", "linf", "spearman", "dice", "iou"):
                row[key] = float("nan")
        elif not fooled and unfooled == "drop":
            row["status"] = "no_finite_tolerance"
            for key in ("eps", "l2", "linf", "spearman", "dice", "iou"):
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
    return runner.Task(
        result_keys=RESULT_KEYS, per_image_columns=PER_IMAGE_COLUMNS, summary_columns=SUMMARY_COLUMNS,
        make_batch_fn=lambda model: make_batch_fn(model, config, attack, search),
        rows=lambda name, host, meta, done: _rows(config, name, host, meta, done),
        summarise=summarise,
        keep_picture=lambda host, k: bool(host["correct"][k] and host["fooled"][k]),
        plot_panels=plot_panels,
        plot_summary=lambda workdir, rows, changed: runner.replot(
            os.path.join(workdir, "tolerance_vs_alignment.png"), changed, lambda path: plot_scatter(path, rows)))


def evaluate(config, progress: bool = True) -> list[dict]:
    """Runs the evaluation of every model in ``config.models``; returns the summary rows."""
    return runner.run(config, task(config), progress=progress)


def format_summary(rows: Sequence[dict]) -> str:
    """The main summary columns as a text table."""
    return format_table(rows, ["model", "num_correct", "num_attacked", "avg_eps", "avg_l2", "avg_linf",
                               "avg_spearman", "num_undefined_spearman", "num_no_finite_tolerance",
                               "wall_time_s"])
