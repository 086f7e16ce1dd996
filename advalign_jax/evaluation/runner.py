"""The per-image evaluation loop shared by ``evaluate`` and ``evaluate-clickme``.

For every model of ``config.models``: load and check the checkpoint (all of them before any output),
then over the ClickMe evaluation batches (global arrays on the mesh): skip batches whose images are
already in the model's per-image CSV (resume), run the task's compiled batch function, append the
new rows, keep a few images for panels, and finally rewrite the summary CSV and the plots. Every
process computes; process 0 writes.

Shared by both evaluations:

- **Intervals** (:mod:`advalign_jax.evaluation.stats`): the summary's means carry 95% percentile
  bootstrap intervals (``config.bootstrap``: ``resamples``, ``confidence``, ``seed``), and
  ``comparison.csv`` holds, for every pair of models of the run, the paired difference of each metric
  over the images both were evaluated on, with its bootstrap interval and the Wilcoxon signed-rank
  p-value (:func:`compare_models`).
- **The cue-swap test** (:mod:`advalign_jax.evaluation.cue_swap`, ``config.cue_swap``): on synthetic
  shards with a patch cue, every image is also classified with the patch repainted in another class's
  colour (``swap``) and in its own class's colour (``congruent``); the copies are read in step with
  the originals by a reader with the same settings. Per-image columns ``cue,swap_cue,swap_pred,
  congruent_pred`` (``-1`` where the data has no patch cue) and ``cue_mass`` (the share of the
  explanation map inside the patch, :func:`advalign_jax.evaluation.metrics.region_fraction`).
- **Axes** (:func:`honest_limits`): a figure never magnifies a gap that lies inside its noise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from advalign_jax import parallel, store
from advalign_jax.errors import AdvalignError, ConfigError
from advalign_jax.evaluation import cue_swap, stats

PICTURE_PREFIX = "picture_"  # batch-function outputs with this prefix are images kept for panels
CUE_COLUMNS = ["cue_mass", "cue", "swap_cue", "swap_pred", "congruent_pred"]
CUE_SUMMARY_COLUMNS = ["cue_swap_accuracy", "cue_swap_accuracy_low", "cue_swap_accuracy_high",
                       "cue_congruent_accuracy", "cue_congruent_accuracy_low", "cue_congruent_accuracy_high",
                       "cue_follow_rate"]
COMPARISON_COLUMNS = ["metric", "model_a", "model_b", "num_pairs", "mean_a", "mean_b", "diff", "diff_low",
                      "diff_high", "wilcoxon_p"]


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
        if not sep or not arch.strip() or not path.strip():
            raise ConfigError(f"config.models entry {item!r} must look like 'ARCH=CHECKPOINT_DIR' "
                              "(e.g. 'resnet50=checkpoints/resnet50')")
        specs.append(ModelSpec(arch.strip(), path.strip(), os.path.basename(os.path.normpath(path.strip()))))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"config.models: two checkpoints share the directory name {dup[0]!r}; "
                          "results are filed by that name")
    return specs


@dataclasses.dataclass(frozen=True)
class Task:
    """What an evaluation computes and writes.

    ``make_batch_fn(model, has_cue)`` -> jitted ``(variables, images, heatmaps, labels, index, mask,
    variants) -> dict`` of per-image arrays (``index``: record index; ``mask``: real, not padding;
    ``variants``: ``{name: images}``, the cue-swap copies of the batch (empty without them), whose
    predictions come back as ``pred_<name>``; ``has_cue``: the data has the patch cue, so ``cue_mass``
    is computed; keys starting with ``picture_`` hold images for panels); ``rows(name, host, meta,
    done)`` -> per-image CSV rows (:func:`cue_fields` gives the cue columns); ``summarise(name, rows,
    seconds)`` -> the summary row (from the CSV rows, strings); ``keep_picture(host, k)`` says whether
    image k of a batch is worth a panel; ``plot_panels(path, name, panels, has_cue)`` and
    ``plot_summary(workdir, summary_rows, changed)`` draw (``changed``: the summary changed in this
    run); ``plot_models(path, [(name, panels)], has_cue)`` draws the models side by side;
    ``comparison_metrics``: ``{metric: row -> float}`` of the paired comparisons (NaN: not defined for
    that image). ``text_columns``: per-image columns that are not numbers.
    """

    result_keys: Sequence[str]
    per_image_columns: Sequence[str]
    summary_columns: Sequence[str]
    make_batch_fn: Callable
    rows: Callable
    summarise: Callable
    keep_picture: Callable
    plot_panels: Callable
    plot_summary: Callable
    text_columns: Sequence[str] = ("model", "status")
    comparison_metrics: Optional[dict] = None
    plot_models: Optional[Callable] = None
    models_figure: str = "models.png"


def load_models(config, specs: Sequence[ModelSpec]) -> list:
    """(spec, model, variables, fingerprint) for every spec; every checkpoint is checked before anything
    runs. The fingerprint (:func:`advalign_jax.store.fingerprint`) keys its results."""
    from advalign_jax.models import load_model  # pylint: disable=import-outside-toplevel

    loaded = []
    for spec in specs:
        model, variables = load_model(spec.path, arch=spec.arch, dtype=config.dtype)
        if model.num_classes != config.data.num_classes:
            raise AdvalignError(f"{spec.path}: the model has {model.num_classes} classes but the data "
                                f"has {config.data.num_classes} (data.num_classes)")
        options = {k: v for k, v in model.options.items() if k != "dtype"}
        loaded.append((spec, model, variables, store.fingerprint(model.name, options, variables)))
    return loaded


class PanelStore:
    """The images shown in ``panels/<model>.png``: the first ``n`` eligible images in record order,
    whatever batches a (resumed) run computed. Their pictures are kept in ``panels/<model>.npz`` so that
    a resumed run draws the same panels."""

    def __init__(self, path: str, n: int, load: bool = True):
        self.path, self.n = path, n
        self.items: dict[int, dict] = {}
        self.changed = False
        self.drawn = False  # drawn again in this run
        if load and os.path.exists(path):
            try:
                with np.load(path, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"]))
                    for i, m in enumerate(meta):
                        self.items[int(m["img"])] = {**m, **{k: z[f"{i}/{k}"] for k in m["arrays"]}}
            except (OSError, ValueError, KeyError):
                self.items = {}  # a damaged file: the panels are drawn again from what this run computes

    def wants(self, img: int) -> bool:
        return self.n > 0 and img not in self.items and (len(self.items) < self.n or img < max(self.items))

    def offer(self, item: dict) -> None:
        self.items[int(item["img"])] = item
        for img in sorted(self.items)[self.n:]:
            del self.items[img]
        self.changed = True

    def panels(self) -> list[dict]:
        return [self.items[i] for i in sorted(self.items)]

    def save(self) -> None:
        arrays, meta = {}, []
        for i, img in enumerate(sorted(self.items)):
            item = self.items[img]
            names = [k for k, v in item.items() if isinstance(v, np.ndarray)]
            meta.append({**{k: _plain_scalar(v) for k, v in item.items() if k not in names}, "arrays": names})
            arrays.update({f"{i}/{k}": item[k] for k in names})
        store.atomic_write(self.path, lambda f: np.savez(f, meta=json.dumps(meta), **arrays), binary=True)
        self.changed = False


def _plain_scalar(v):
    return v.item() if isinstance(v, np.generic) else v


def run(config, task: Task, progress: bool = True, log=None) -> list[dict]:
    """Evaluates every model of ``config.models``; returns the summary rows.

    Crash safety (:mod:`advalign_jax.store`): one run per workdir (a lock), rows appended whole and
    synced batch by batch, torn rows dropped and recomputed on resume, summaries and figures replaced
    atomically; ``config.json`` is recorded with the first result and ``models.json`` ties each result
    name to its checkpoint's fingerprint.
    """
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    from advalign_jax.data.config_block import reader_config  # pylint: disable=import-outside-toplevel
    from advalign_jax.data.reader import ClickMeReader  # pylint: disable=import-outside-toplevel

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    parallel.initialize_distributed(bool(config.distributed))
    specs = parse_model_specs(config.models)
    loaded = load_models(config, specs)
    mesh = parallel.make_mesh(devices=jax.devices()[:config.num_devices] if config.num_devices else None)
    n_data = parallel.data_parallel_size(mesh)
    global_batch = int(config.data.batch_size)
    if global_batch % (n_data * jax.process_count()):
        global_batch = math.ceil(global_batch / n_data) * n_data  # a multiple of the devices
    per_process = global_batch // jax.process_count()
    writer = jax.process_index() == 0
    workdir = config.workdir
    reader_cfg = reader_config(config.data, per_process_batch=per_process)
    first_reader = ClickMeReader(reader_cfg)
    first_reader.check_not_empty()  # before the workdir is touched
    limit: Optional[int] = config.max_images if config.max_images >= 0 else None
    cue = cue_swap.find(first_reader.files, int(config.data.num_classes)) if config.cue_swap else None

    record = store.RunRecord(workdir, config, task.result_keys)
    files = {}
    variants = None
    lock = store.WorkdirLock(workdir) if writer else None
    try:
        if writer:
            store.make_dirs(os.path.join(workdir, "per_image"))
            validate = store.numeric_row(task.per_image_columns, task.text_columns)
            for spec, *_ in loaded:
                files[spec.name] = store.RowFile(os.path.join(workdir, "per_image", f"{spec.name}.csv"),
                                                 task.per_image_columns, key="img", validate=validate, log=log)
            record.check(has_results=any(f.rows for f in files.values()))
            record.check_models({spec.name: {"path": spec.path, "fingerprint": fp} for spec, _, _, fp in loaded},
                                lambda name: bool(files[name].rows))
        if cue is not None:
            variants = _cue_variants(cue, files, limit, writer, log)
        runs = [_run_model(config, task, mesh, spec, model, variables, fp, files.get(spec.name), record,
                           reader_cfg, per_process, global_batch, limit, progress, writer, specs, cue, variants)
                for spec, model, variables, fp in loaded]
        summary = Summary(row for row, _ in runs)
        if writer and len(runs) > 1:
            rows_by_model = {spec.name: files[spec.name].rows for spec, *_ in loaded}
            summary.comparison = _write_comparison(config, task, rows_by_model)
            if task.plot_models is not None:
                _plot_models(config, task, [(spec.name, panels) for (spec, *_), (_, panels) in zip(loaded, runs)],
                             cue is not None)
    finally:
        if lock is not None:
            lock.release()
        if variants is not None:
            variants.close()
    return summary


class Summary(list):
    """The summary rows of a run (one per model, in the order of ``config.models``); ``comparison``
    holds the rows of ``comparison.csv`` (empty with one model, and on processes other than 0)."""

    comparison: list = []


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


def cue_fields(host: dict, meta: dict, k: int) -> dict:
    """The per-image cue columns (:data:`CUE_COLUMNS`) of image ``k`` of a batch."""
    return {"cue_mass": float(host["cue_mass"][k]) if "cue_mass" in host else float("nan"),
            "cue": int(meta["cue"][k]), "swap_cue": int(meta["swap_cue"][k]),
            "swap_pred": int(host["pred_swap"][k]) if "pred_swap" in host else cue_swap.NO_CUE,
            "congruent_pred": int(host["pred_congruent"][k]) if "pred_congruent" in host else cue_swap.NO_CUE}


def cue_summary(rows: Sequence[dict], boot: dict) -> dict:
    """The cue-swap test of one model (:data:`CUE_SUMMARY_COLUMNS`) from its per-image rows: accuracy on
    the swapped copies and on the congruent ones (with their bootstrap intervals), and the share of
    swapped copies classified as the painted class; NaN without the test."""
    tested = [r for r in rows if int(r["swap_cue"]) >= 0]
    out = {}
    with_interval(out, "cue_swap_accuracy", [int(r["swap_pred"]) == int(r["label"]) for r in tested], boot)
    with_interval(out, "cue_congruent_accuracy", [int(r["congruent_pred"]) == int(r["label"]) for r in tested], boot)
    out["cue_follow_rate"] = (float(np.mean([int(r["swap_pred"]) == int(r["swap_cue"]) for r in tested]))
                              if tested else float("nan"))
    return out


def swap_correct(row: dict) -> float:
    """1 / 0: the swapped copy is classified correctly; NaN without the cue-swap test."""
    return float(int(row["swap_pred"]) == int(row["label"])) if int(row["swap_cue"]) >= 0 else float("nan")


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


def _write_comparison(config, task, rows_by_model) -> list[dict]:
    if not task.comparison_metrics:
        return []
    rows = compare_models(rows_by_model, task.comparison_metrics, bootstrap_options(config))
    path = os.path.join(config.workdir, "comparison.csv")
    text = store.csv_text([COMPARISON_COLUMNS] + [[store.fmt(r[c]) for c in COMPARISON_COLUMNS] for r in rows])
    old = None
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = f.read()
    if old != text:
        store.atomic_write_text(path, text)
    return rows


def _plot_models(config, task, named_panels, has_cue) -> None:
    path = os.path.join(config.workdir, task.models_figure)
    named_panels = [(name, p) for name, p in named_panels if p is not None and p.items]
    if not named_panels:
        return
    if any(p.drawn for _, p in named_panels) or not os.path.exists(path):
        with store.writing(path):
            task.plot_models(path, [(name, p.panels()) for name, p in named_panels], has_cue)


def _cue_variants(cue, files, limit, writer, log):
    """The cue-swap copies of the records some model still needs (every process writes its own)."""
    n = len(cue.cue)
    needed = np.zeros(n, bool)
    if writer:
        for r in range(n if limit is None else min(n, limit)):
            needed[r] = any(str(r) not in f.rows for f in files.values())
    needed = parallel.from_process_0(needed)
    if not needed.any():
        return None
    return cue_swap.Variants(cue, needed, log)


def _run_model(config, task, mesh, spec, model, variables, fp, per_image, record, reader_cfg, per_process,
               global_batch, limit, progress, writer, specs, cue, variants) -> tuple:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    from advalign_jax.data.reader import ClickMeReader  # pylint: disable=import-outside-toplevel

    workdir = config.workdir
    done = set(int(k) for k in per_image.rows) if per_image is not None else set()
    timing_path = os.path.join(workdir, "per_image", f"{spec.name}.time.json")
    spent = float((store.read_json(timing_path, {}) or {}).get("seconds", 0.0)) if writer else 0.0
    panels = PanelStore(os.path.join(workdir, "panels", f"{spec.name}.npz"), int(config.num_panels), load=writer)
    reader = ClickMeReader(reader_cfg)
    total = reader.num_batches if limit is None else min(reader.num_batches, math.ceil(limit / per_process))
    num_records = sum(reader.record_counts) if limit is None else min(sum(reader.record_counts), limit)
    batch_fn = task.make_batch_fn(model, cue is not None)
    vfiles = variants.files if variants is not None and variants.files else {}
    vreaders = {v: ClickMeReader(dataclasses.replace(reader_cfg, files=tuple(fs))) for v, fs in vfiles.items()}
    pictures_at = jax.jit(lambda out, pos: {k: v[pos] for k, v in out.items() if k.startswith(PICTURE_PREFIX)},
                          out_shardings=parallel.replicated(mesh))
    params = parallel.replicate(variables, mesh)
    bar = tqdm(total=total, desc=spec.name, unit="batch", disable=not (progress and writer), file=sys.stderr)
    try:
        streams = [reader.take(total)] + [r.take(total) for r in vreaders.values()]
        for batch, *copies in zip(*streams):
            for copy in copies:  # the copies are read in step with the originals
                if not (np.array_equal(copy["index"], batch["index"]) and np.array_equal(copy["label"], batch["label"])):
                    raise AdvalignError("the cue-swap copies went out of step with the data (records "
                                        f"{batch['index'][:3].tolist()}...); rerun with --config.cue_swap=false")
            mask = batch["mask"] & (batch["index"] < limit) if limit is not None else batch["mask"]
            meta = parallel.to_host({"mask": mask, "index": batch["index"], "label": batch["label"]})
            at = np.clip(meta["index"], 0, len(cue.cue) - 1) if cue is not None else None
            meta["cue"] = cue.cue[at] if cue is not None else np.full(len(meta["index"]), cue_swap.NO_CUE)
            meta["swap_cue"] = cue.swap[at] if vreaders else np.full(len(meta["index"]), cue_swap.NO_CUE)
            # Process 0 holds the results: it decides, for every process, whether the batch is done.
            finished = all(int(j) in done for j in meta["index"][meta["mask"]])
            if bool(parallel.from_process_0(np.asarray(finished))):
                bar.update(1)
                continue
            start = time.perf_counter()
            inputs = parallel.shard_batch({**{k: batch[k] for k in ("image", "heatmap", "label")},
                                           "index": batch["index"].astype(np.int32), "mask": mask,
                                           "variants": {v: c["image"] for v, c in zip(vreaders, copies)}}, mesh)
            out = batch_fn(params, inputs["image"], inputs["heatmap"], inputs["label"], inputs["index"],
                           inputs["mask"], inputs["variants"])
            host = parallel.to_host({k: v for k, v in out.items() if not k.startswith(PICTURE_PREFIX)})
            meta["num_records"] = num_records
            rows = task.rows(spec.name, host, meta, done)
            # Pictures of the eligible images that enter the first num_panels in record order; process 0
            # decides, every process takes part in the gather.
            wanted = [k for k in np.argsort(meta["index"], kind="stable")
                      if meta["mask"][k] and task.keep_picture(host, k) and panels.wants(int(meta["index"][k]))]
            pos = np.full((max(int(config.num_panels), 1),), -1, np.int32)
            pos[:min(len(wanted), len(pos))] = wanted[:len(pos)]
            pos = parallel.from_process_0(pos)
            if np.any(pos >= 0):
                pics = parallel.to_host(pictures_at(out, np.maximum(pos, 0)))
                for j, k in enumerate(int(q) for q in pos if q >= 0):
                    panels.offer({"img": int(meta["index"][k]), "label": int(meta["label"][k]),
                                  **{key: _plain_scalar(np.asarray(host[key][k])) for key in host},
                                  **{key[len(PICTURE_PREFIX):]: np.asarray(v[j]) for key, v in pics.items()}})
            if writer:
                if panels.changed:  # pictures first: a batch whose rows are kept has its pictures kept
                    store.make_dirs(os.path.join(workdir, "panels"))
                    panels.save()
                record.commit()
                record.commit_model(spec.name, {"path": spec.path, "fingerprint": fp})
                per_image.append(rows)
                spent += time.perf_counter() - start
                store.atomic_write_json(timing_path, {"seconds": spent})
            done.update(int(r["img"]) for r in rows)
            bar.update(1)
    finally:
        bar.close()
    # In record order: the bootstrap's draws index the values, so the same rows give the same intervals
    # whatever order the batches (or the processes' slices of them) were written in.
    rows = sorted(per_image.rows.values(), key=lambda r: int(r["img"])) if writer else []
    row = task.summarise(spec.name, rows, spent)
    if writer:
        summary_path = os.path.join(workdir, "summary.csv")
        existing = store.read_csv(summary_path)
        by_name = {r["model"]: r for r in existing}
        new = {c: store.fmt(row[c]) for c in task.summary_columns}
        changed = by_name.get(spec.name) != new
        by_name[spec.name] = new
        order = [s.name for s in specs]
        ordered = [by_name[n] for n in order if n in by_name] + [r for n, r in by_name.items() if n not in order]
        if changed:
            store.write_csv(summary_path, task.summary_columns, ordered)
        panel_png = os.path.join(workdir, "panels", f"{spec.name}.png")
        if panels.items and (changed or not os.path.exists(panel_png)):
            store.make_dirs(os.path.join(workdir, "panels"))
            with store.writing(panel_png):
                task.plot_panels(panel_png, spec.name, panels.panels(), cue is not None)
            panels.drawn = True
        with store.writing(workdir):
            task.plot_summary(workdir, ordered, changed)
    return row, (panels if writer else None)


def replot(path: str, changed: bool, draw: Callable) -> None:
    """Draws ``path`` when its data changed in this run or it is missing (a finished run reopened in a
    read-only directory writes nothing)."""
    if changed or not os.path.exists(path):
        draw(path)


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Saves a matplotlib figure atomically and closes it."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    try:
        store.atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"), binary=True)
    finally:
        plt.close(fig)


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


def format_interval(row: dict, key: str, digits: int = 3, scale: float = 1.0) -> str:
    """``mean [low, high]`` of ``row[key]`` and its interval columns (times ``scale``), for printed tables."""
    def num(v):
        try:
            return float(v) * scale
        except (TypeError, ValueError):
            return float("nan")

    m, lo, hi = num(row.get(key)), num(row.get(f"{key}_low")), num(row.get(f"{key}_high"))
    if not math.isfinite(m):
        return "-"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A fixed-width text table (floats to 4 significant digits)."""
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else store.fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_comparison(rows: Sequence[dict]) -> str:
    """The paired differences (:func:`compare_models` rows) as a text table."""
    def p_text(p):
        return "-" if not math.isfinite(p) else f"{p:.2g}"

    table = [{"metric": r["metric"], "a": r["model_a"], "b": r["model_b"], "n": r["num_pairs"],
              "a mean": f"{r['mean_a']:.3g}" if math.isfinite(r["mean_a"]) else "-",
              "b mean": f"{r['mean_b']:.3g}" if math.isfinite(r["mean_b"]) else "-",
              "b - a [95% CI]": (f"{r['diff']:+.3g} [{r['diff_low']:+.3g}, {r['diff_high']:+.3g}]"
                                 if math.isfinite(r["diff"]) else "-"),
              "wilcoxon p": p_text(r["wilcoxon_p"]),
              "": "*" if math.isfinite(r["diff_low"]) and (r["diff_low"] > 0 or r["diff_high"] < 0) else ""}
             for r in rows]
    return format_table(table, list(table[0])) if table else ""


def honest_limits(centres, lows, highs, min_span: float, bounds=(-math.inf, math.inf),
                  include=None) -> tuple[float, float]:
    """Axis limits that never magnify a gap inside its noise.

    The rule: the axis shows every interval ``[low, high]`` (and ``include``, e.g. 0 for a ratio
    scale), padded by 10% on each side, and spans at least ``max(min_span, 4 * w)``, ``w`` the widest
    interval on it, centred on the data; the limits are then kept inside the metric's ``bounds`` (the
    span is shifted, not shrunk, where it can be). So two means whose intervals overlap are never drawn
    further apart than about a quarter of the axis, and ``min_span`` (a fixed share of the metric's
    scale: 0.5 of Spearman's [-1, 1], 0.5 of a proportion's [0, 1]) keeps a noiseless tiny gap small.
    """
    values = [float(v) for v in list(centres) + list(lows) + list(highs) if math.isfinite(float(v))]
    if include is not None:
        values.append(float(include))
    if not values:
        return (0.0, 1.0) if not math.isfinite(bounds[0]) else (bounds[0], bounds[0] + max(min_span, 1.0))
    widths = [float(h) - float(l) for l, h in zip(lows, highs) if math.isfinite(float(h) - float(l))]
    lo, hi = min(values), max(values)
    span = max(hi - lo, min_span, 4.0 * max(widths, default=0.0))
    pad = 0.1 * span
    centre = (lo + hi) / 2.0
    lo, hi = centre - span / 2.0 - pad, centre + span / 2.0 + pad
    if lo < bounds[0]:
        lo, hi = bounds[0], min(bounds[1], hi + (bounds[0] - lo))
    if hi > bounds[1]:
        lo, hi = max(bounds[0], lo - (hi - bounds[1])), bounds[1]
    return lo, hi
