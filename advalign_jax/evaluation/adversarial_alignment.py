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

import csv
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax import parallel
from advalign_jax.attacks.pgd import PGDConfig
from advalign_jax.attacks.search import ReferenceSearch, doubling_search, reference_search
from advalign_jax.errors import AdvalignError, ConfigError
from advalign_jax.evaluation import metrics

PER_IMAGE_COLUMNS = ["model", "img", "label", "pred", "eps", "l2", "linf", "spearman",
                     "clean_pred", "status", "dice", "iou"]
SUMMARY_COLUMNS = ["model", "num_correct", "avg_eps", "std_eps", "avg_l2", "std_l2", "avg_linf", "std_linf",
                   "avg_spearman", "std_spearman", "num_images", "num_attacked", "num_no_finite_tolerance",
                   "num_undefined_spearman", "avg_dice", "avg_iou", "wall_time_s"]
# Config keys whose values decide the results (a resumed run must agree on them).
RESULT_KEYS = ("data", "attack", "search", "attack_domain", "resize_to_model", "resize_method", "dtype",
               "max_images", "seed")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    arch: str
    path: str
    name: str


def parse_model_specs(models: Sequence[str]) -> list[ModelSpec]:
    """'ARCH=CHECKPOINT_DIR' strings -> specs; the display name is the directory's base name."""
    if isinstance(models, str):
        models = (models,)
    if not models:
        raise ConfigError("config.models is empty: give at least one 'ARCH=CHECKPOINT_DIR'")
    specs = []
    for item in models:
        arch, sep, path = str(item).partition("=")
        if not sep or not arch or not path:
            raise ConfigError(f"config.models entry {item!r} must look like 'ARCH=CHECKPOINT_DIR' "
                              "(e.g. 'resnet50=checkpoints/resnet50')")
        specs.append(ModelSpec(arch.strip(), path.strip(), os.path.basename(os.path.normpath(path.strip()))))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"config.models: two checkpoints share the directory name {dup[0]!r}; "
                          "results are filed by that name")
    return specs


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


def to_attack_domain(x, domain: str, norm):
    """Images in [0, 1] -> the space the attack works in (see the config's ``attack_domain``)."""
    if domain == "unit":
        return x
    if domain == "minmax":  # per image, as the PyTorch reference fed its models
        lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
        hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
        return (x - lo) / jnp.maximum(hi - lo, 1e-12)
    if domain == "standardized":  # the TensorFlow reference attacked the normalised input
        return norm(x)
    raise ConfigError(f"attack_domain must be 'unit', 'minmax' or 'standardized', got {domain!r}")


def make_batch_fn(model, config, attack: PGDConfig, search: ReferenceSearch):
    """A jitted ``(variables, images, heatmaps, labels) -> per-image results`` for one model."""
    domain = config.attack_domain
    norm = model.module.norm if hasattr(model.module, "norm") else None
    attack_model = model
    if domain != "unit":
        from advalign_jax.models import get_model  # pylint: disable=import-outside-toplevel

        attack_model = get_model(model.name, **{**model.options, "norm": "none"})
    s = config.search

    def fn(variables, images, heatmaps, labels):
        if config.resize_to_model and images.shape[1:3] != tuple(model.input_shape[:2]):
            size = model.input_shape[:2]
            images = jax.image.resize(images, (images.shape[0], *size, 3), method=config.resize_method)
            heatmaps = jax.image.resize(heatmaps, (heatmaps.shape[0], *size), method=config.resize_method)
        x = to_attack_domain(images, domain, norm)
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
            "x": x, "x_adv": out["x_adv"], "heatmap": heatmaps, "pmask": pmask,
        }

    return jax.jit(fn)


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(round(v, 6)) if abs(v) >= 1e-4 else f"{v:.6g}"
    return str(v)


class PerImageFile:
    """The per-image CSV of one model: appended batch by batch, read back on resume."""

    def __init__(self, path: str):
        self.path = path
        self.rows: dict[int, dict] = {}
        if os.path.exists(path):
            with open(path, newline="") as f:
                lines = f.read().splitlines()
            good = [lines[0]] if lines else []
            for line in lines[1:]:
                fields = next(csv.reader([line]))
                if len(fields) != len(PER_IMAGE_COLUMNS):
                    continue  # a line cut short by an interruption
                row = dict(zip(PER_IMAGE_COLUMNS, fields))
                if int(row["img"]) not in self.rows:
                    self.rows[int(row["img"])] = row
                    good.append(line)
            if lines and lines[0].split(",") != PER_IMAGE_COLUMNS:
                raise AdvalignError(f"{path}: not a per-image results file of this tool (unexpected header)")
            with open(path + ".tmp", "w", newline="") as f:
                f.write("\n".join(good) + "\n")
            os.replace(path + ".tmp", path)

    def append(self, rows: list[dict]) -> None:
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(PER_IMAGE_COLUMNS)
            writer.writerows([[_fmt(r[c]) for c in PER_IMAGE_COLUMNS] for r in rows])
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[int(r["img"])] = {c: _fmt(r[c]) for c in PER_IMAGE_COLUMNS}


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


def write_summary(path: str, rows: Sequence[dict]) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY_COLUMNS)
        writer.writerows([[_fmt(r[c]) for c in SUMMARY_COLUMNS] for r in rows])
    os.replace(path + ".tmp", path)


def check_workdir(workdir: str, config) -> None:
    """Refuses a workdir that holds results of a different configuration; records the config."""
    path = os.path.join(workdir, "config.json")
    current = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k] for k in RESULT_KEYS}
    current = json.loads(json.dumps(current))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for key in RESULT_KEYS:
            if saved.get(key) != current[key]:
                diff = _first_difference(saved.get(key), current[key], key)
                raise AdvalignError(f"{workdir} holds results of a different configuration ({diff}); "
                                    "use another --config.workdir or remove that folder")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(current, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _first_difference(a, b, key):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{key}.{k}")
    return f"{key}: {a!r} there, {b!r} now"


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
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


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
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


def _rows_from_batch(name: str, out: dict, batch_mask, indices, labels, unfooled: str, gate: float,
                     done: set) -> list[dict]:
    rows = []
    for k in np.flatnonzero(batch_mask):
        img = int(indices[k])
        if img in done:
            continue
        correct, fooled = bool(out["correct"][k]), bool(out["fooled"][k])
        row = {"model": name, "img": img, "label": int(labels[k]), "clean_pred": int(out["clean_pred"][k]),
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


def evaluate(config, progress: bool = True, log=print) -> list[dict]:
    """Runs the evaluation of every model in ``config.models``; returns the summary rows."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    from advalign_jax.data.config_block import reader_config  # pylint: disable=import-outside-toplevel
    from advalign_jax.data.reader import ClickMeReader  # pylint: disable=import-outside-toplevel
    from advalign_jax.models import load_model  # pylint: disable=import-outside-toplevel

    parallel.initialize_distributed(bool(config.distributed))
    specs = parse_model_specs(config.models)
    attack = attack_config(config)
    search = search_config(config)
    to_attack_domain(jnp.zeros((1, 2, 2, 3)), config.attack_domain, lambda x: x)  # validates the name
    loaded = []
    for spec in specs:  # every checkpoint is checked before any result is written
        model, variables = load_model(spec.path, arch=spec.arch, dtype=config.dtype)
        if model.num_classes != config.data.num_classes:
            raise AdvalignError(f"{spec.path}: the model has {model.num_classes} classes but the data "
                                f"has {config.data.num_classes} (data.num_classes)")
        loaded.append((spec, model, variables))

    mesh = parallel.make_mesh(devices=jax.devices()[:config.num_devices] if config.num_devices else None)
    n_data = parallel.data_parallel_size(mesh)
    global_batch = int(config.data.batch_size)
    if global_batch % (n_data * jax.process_count()):
        global_batch = math.ceil(global_batch / n_data) * n_data  # pad up to a multiple of the devices
    per_process = global_batch // jax.process_count()
    writer = jax.process_index() == 0
    workdir = config.workdir
    if writer:
        check_workdir(workdir, config)
        os.makedirs(os.path.join(workdir, "per_image"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "panels"), exist_ok=True)

    summary_path = os.path.join(workdir, "summary.csv")
    summary = []
    for spec, model, variables in loaded:
        per_image = PerImageFile(os.path.join(workdir, "per_image", f"{spec.name}.csv"))
        timing_path = os.path.join(workdir, "per_image", f"{spec.name}.time.json")
        spent = json.load(open(timing_path))["seconds"] if os.path.exists(timing_path) else 0.0
        reader = ClickMeReader(reader_config(config.data, per_process_batch=per_process))
        limit = config.max_images if config.max_images >= 0 else None
        total = reader.num_batches if limit is None else min(reader.num_batches, math.ceil(limit / per_process))
        batch_fn = make_batch_fn(model, config, attack, search)
        first_rows = jax.jit(lambda out, n: {k: out[k][:n] for k in ("x", "x_adv", "heatmap", "pmask")},
                             static_argnums=1, out_shardings=parallel.replicated(mesh))
        params = parallel.replicate(variables, mesh)
        panels, panel_path = [], os.path.join(workdir, "panels", f"{spec.name}.png")
        bar = tqdm(total=total, desc=spec.name, unit="batch", disable=not (progress and writer), file=sys.stderr)
        for i, batch in enumerate(reader.take(total)):
            mask = batch["mask"] & (batch["index"] < limit) if limit is not None else batch["mask"]
            done_here = all(int(j) in per_image.rows for j in batch["index"][mask])
            if parallel.all_processes(done_here):
                bar.update(1)
                continue
            start = time.perf_counter()
            inputs = parallel.shard_batch({k: batch[k] for k in ("image", "heatmap", "label")}, mesh)
            out = batch_fn(params, inputs["image"], inputs["heatmap"], inputs["label"])
            host = parallel.to_host({k: v for k, v in out.items() if k not in ("x", "x_adv", "heatmap", "pmask")})
            meta = parallel.to_host({"mask": mask, "index": batch["index"], "label": batch["label"]})
            rows = _rows_from_batch(spec.name, host, meta["mask"], meta["index"], meta["label"],
                                    config.search.unfooled, float(config.search.gate_eps), set(per_image.rows))
            if writer:
                per_image.append(rows)
                spent += time.perf_counter() - start
                with open(timing_path + ".tmp", "w") as f:
                    json.dump({"seconds": spent}, f)
                os.replace(timing_path + ".tmp", timing_path)
            if len(panels) < config.num_panels:  # every process takes part: the arrays are gathered
                pictures = first_rows(out, min(config.num_panels, global_batch))
                panels.extend(_panel_data(pictures, host, meta, config.num_panels - len(panels)))
            bar.update(1)
        bar.close()
        row = summarise(spec.name, list(per_image.rows.values()), spent)
        summary.append(row)
        if writer:
            if panels:
                plot_panels(panel_path, spec.name, panels)
            existing = _read_summary(summary_path)
            existing[spec.name] = row
            write_summary(summary_path, [existing[s.name] for s in specs if s.name in existing] +
                          [r for n, r in existing.items() if n not in {s.name for s in specs}])
            plot_scatter(os.path.join(workdir, "tolerance_vs_alignment.png"), list(existing.values()))
    return summary


def _panel_data(pictures, host, meta, want: int) -> list[dict]:
    """Panels for the attacked images among the first rows of the batch (``pictures``)."""
    picked = []
    n = len(pictures["x"])
    for k in np.flatnonzero(meta["mask"][:n]):
        if len(picked) >= want:
            break
        if not (host["correct"][k] and host["fooled"][k]):
            continue
        picked.append({"img": int(meta["index"][k]), "label": int(meta["label"][k]), "pred": int(host["pred"][k]),
                       "eps": float(host["eps"][k]), "spearman": float(host["spearman"][k]),
                       "x": np.asarray(pictures["x"][k]), "x_adv": np.asarray(pictures["x_adv"][k]),
                       "heatmap": np.asarray(pictures["heatmap"][k]), "pmask": np.asarray(pictures["pmask"][k])})
    return picked


def _read_summary(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {r["model"]: r for r in csv.DictReader(f)}


def format_summary(rows: Sequence[dict]) -> str:
    """A fixed-width table of the main summary columns."""
    cols = ["model", "num_correct", "num_attacked", "avg_eps", "avg_l2", "avg_linf", "avg_spearman",
            "num_undefined_spearman", "num_no_finite_tolerance", "wall_time_s"]
    cells = [[_fmt(r[c]) if not isinstance(r[c], float) else f"{r[c]:.4g}" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
