"""The per-image ClickMe evaluation of many models: ``evaluate`` and ``evaluate-clickme``.

A :class:`Task` says what an evaluation computes on a batch of ClickMe images and human maps and what it
writes (the adversarial-alignment study, :mod:`advalign_jax.evaluation.adversarial_alignment`; the
human-alignment score, :mod:`advalign_jax.evaluation.human_alignment`). :func:`run` runs a task for every
model of ``config.models``: load and check every checkpoint before any output, then for each model its
:class:`~advalign_jax.evaluation.protocol.Evaluator` over the ClickMe evaluation batches
(:func:`~advalign_jax.evaluation.protocol.run_batches`, global arrays on the mesh) inside the workdir's
:class:`~advalign_jax.evaluation.job.EvaluationJob`: batches whose images are in the model's per-image
CSV are skipped (resume), the new rows are appended, a few images are kept for panels, and finally the
summary CSV, ``comparison.csv`` (:func:`advalign_jax.evaluation.summaries.compare_models`) and the
figures are rewritten where they changed. Every process computes; process 0 writes.

**The cue-swap test** (:mod:`advalign_jax.evaluation.cue_swap`, ``config.cue_swap``): on synthetic
shards with a patch cue, every image is also classified with the patch repainted in another class's
colour (``swap``) and in its own class's colour (``congruent``); the copies are read in step with the
originals by a reader with the same settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from advalign_jax import parallel, store
from advalign_jax.data.config_block import reader_config
from advalign_jax.data.reader import ClickMeReader
from advalign_jax.errors import AdvalignError, ConfigError
from advalign_jax.evaluation import cue_swap
from advalign_jax.evaluation.job import EvaluationJob
from advalign_jax.evaluation.panels import PanelStore, plain_scalar
from advalign_jax.evaluation.protocol import Evaluator, round_batch, run_batches
from advalign_jax.evaluation.summaries import COMPARISON_COLUMNS, bootstrap_options, compare_models
from advalign_jax.models import fingerprint, load_model

PICTURE_PREFIX = "picture_"  # batch-function outputs with this prefix are images kept for panels
# Config keys a resumed run may change (advalign_jax.run_record): the models (each result name is tied to
# its checkpoint's fingerprint in models.json), the summaries' bootstrap, the panels, where it runs.
CHANGEABLE = ("models", "workdir", "num_panels", "bootstrap", "distributed", "num_devices")


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
    """What a ClickMe evaluation computes and writes.

    ``batch_fn(model, has_cue)`` -> jitted ``(variables, images, heatmaps, labels, index, mask,
    variants) -> dict`` of per-image arrays (``index``: record index; ``mask``: real, not padding;
    ``variants``: ``{name: images}``, the cue-swap copies of the batch (empty without them), whose
    predictions come back as ``pred_<name>``; ``has_cue``: the data has the patch cue, so ``cue_mass``
    is computed; keys starting with ``picture_`` hold images for panels); ``rows(name, host, meta,
    done)`` -> per-image CSV rows (:func:`advalign_jax.evaluation.cue_swap.cue_fields` gives the cue
    columns); ``summarise(name, rows, seconds)`` -> the summary row (from the CSV rows, strings);
    ``keep_picture(host, k)`` says whether image k of a batch is worth a panel; ``plot_panels(path,
    name, panels, has_cue)`` draws one model's panels, ``plot_summary(path, summary_rows)`` the
    summary figure ``summary_figure``, ``plot_models(path, [(name, panels)], has_cue)`` the models side
    by side (``models_figure``); ``comparison_metrics``: ``{metric: row -> float}`` of the paired
    comparisons (NaN: not defined for that image). ``text_columns``: per-image columns that are not
    numbers.
    """

    per_image_columns: Sequence[str]
    summary_columns: Sequence[str]
    batch_fn: Callable
    rows: Callable
    summarise: Callable
    keep_picture: Callable
    plot_panels: Callable
    plot_summary: Callable
    summary_figure: str
    text_columns: Sequence[str] = ("model", "status")
    comparison_metrics: Optional[dict] = None
    plot_models: Optional[Callable] = None
    models_figure: str = "models.png"


def load_models(config, specs: Sequence[ModelSpec]) -> list:
    """(spec, model, variables, fingerprint) for every spec; every checkpoint is checked before anything
    runs. The fingerprint (:func:`advalign_jax.models.checkpoint.fingerprint`) keys its results."""
    loaded = []
    for spec in specs:
        model, variables = load_model(spec.path, arch=spec.arch, dtype=config.dtype)
        if model.num_classes != config.data.num_classes:
            raise AdvalignError(f"{spec.path}: the model has {model.num_classes} classes but the data "
                                f"has {config.data.num_classes} (data.num_classes)")
        options = {k: v for k, v in model.options.items() if k != "dtype"}
        loaded.append((spec, model, variables, fingerprint(model.name, options, variables)))
    return loaded


class Summary(list):
    """The summary rows of a run (one per model, in the order of ``config.models``); ``comparison``
    holds the rows of ``comparison.csv`` (empty with one model, and on processes other than 0)."""

    comparison: list = []


@dataclasses.dataclass
class _Run:
    """What every model's evaluation shares: the job, the reader settings, the record limit, the cue."""

    config: object
    task: Task
    mesh: object
    job: EvaluationJob
    reader_cfg: object
    per_process: int
    limit: Optional[int]
    cue: Optional[cue_swap.CueData]
    variants: Optional[cue_swap.Variants]
    order: list
    progress: bool


def run(config, task: Task, progress: bool = True, log=None) -> Summary:
    """Evaluates every model of ``config.models``; returns the summary rows (the module docstring)."""
    mesh = parallel.job_mesh(config)
    specs = parse_model_specs(config.models)
    loaded = load_models(config, specs)
    per_process = round_batch(int(config.data.batch_size), mesh) // jax.process_count()
    reader_cfg = reader_config(config.data, per_process_batch=per_process)
    first_reader = ClickMeReader(reader_cfg)
    first_reader.check_not_empty()  # before the workdir is touched
    limit: Optional[int] = config.max_images if config.max_images >= 0 else None
    cue = cue_swap.find(first_reader.files, int(config.data.num_classes)) if config.cue_swap else None
    with EvaluationJob(config, CHANGEABLE, log) as job:
        validate = store.numeric_row(task.per_image_columns, task.text_columns)
        files = {spec.name: job.open_rows(job.path("per_image", f"{spec.name}.csv"), task.per_image_columns,
                                          validate) for spec, *_ in loaded}
        job.check(any(f is not None and f.rows for f in files.values()),
                  {spec.name: {"path": spec.path, "fingerprint": fp} for spec, _, _, fp in loaded},
                  lambda name: bool(files[name].rows))
        variants = _cue_variants(cue, files, limit, job) if cue is not None else None
        shared = _Run(config, task, mesh, job, reader_cfg, per_process, limit, cue, variants,
                      [s.name for s in specs], progress)
        try:
            runs = [_run_model(shared, spec, model, variables, fp, files[spec.name])
                    for spec, model, variables, fp in loaded]
        finally:
            if variants is not None:
                variants.close()
        summary = Summary(row for row, _ in runs)
        if job.writer and len(runs) > 1:
            rows_by_model = {spec.name: files[spec.name].rows for spec, *_ in loaded}
            summary.comparison = _write_comparison(config, task, job, rows_by_model)
            if task.plot_models is not None:
                named = [(spec.name, panels) for (spec, *_), (_, panels) in zip(loaded, runs)]
                _plot_models(task, job, named, cue is not None)
    return summary


def _write_comparison(config, task, job, rows_by_model) -> list[dict]:
    if not task.comparison_metrics:
        return []
    rows = compare_models(rows_by_model, task.comparison_metrics, bootstrap_options(config))
    job.write_csv(job.path("comparison.csv"), COMPARISON_COLUMNS, rows)
    return rows


def _plot_models(task, job, named_panels, has_cue) -> None:
    named_panels = [(name, p) for name, p in named_panels if p is not None and p.items]
    if named_panels:
        job.draw(job.path(task.models_figure), any(p.drawn for _, p in named_panels),
                 lambda path: task.plot_models(path, [(name, p.panels()) for name, p in named_panels], has_cue))


def _cue_variants(cue, files, limit, job):
    """The cue-swap copies of the records some model still needs (every process writes its own)."""
    n = len(cue.cue)
    needed = np.zeros(n, bool)
    if job.writer:
        for r in range(n if limit is None else min(n, limit)):
            needed[r] = any(str(r) not in f.rows for f in files.values())
    needed = parallel.from_process_0(needed)
    if not needed.any():
        return None
    return cue_swap.Variants(cue, needed, job.log)


def _batches(run: _Run, reader, vreaders: dict, total: int):
    """The evaluation batches of ``reader`` with the cue-swap copies read in step (``variants``) and the
    record limit applied to ``mask``."""
    streams = [reader.take(total)] + [r.take(total) for r in vreaders.values()]
    for batch, *copies in zip(*streams):
        for copy in copies:  # the copies are read in step with the originals
            if not (np.array_equal(copy["index"], batch["index"]) and np.array_equal(copy["label"], batch["label"])):
                raise AdvalignError("the cue-swap copies went out of step with the data (records "
                                    f"{batch['index'][:3].tolist()}...); rerun with --config.cue_swap=false")
        mask = batch["mask"] & (batch["index"] < run.limit) if run.limit is not None else batch["mask"]
        yield {"image": batch["image"], "heatmap": batch["heatmap"], "label": batch["label"],
               "index": batch["index"].astype(np.int32), "mask": mask,
               "variants": {v: c["image"] for v, c in zip(vreaders, copies)}}


def _run_model(run: _Run, spec, model, variables, fp, per_image) -> tuple:
    config, task, job = run.config, run.task, run.job
    done = set(int(k) for k in per_image.rows) if per_image is not None else set()
    timing_path = job.path("per_image", f"{spec.name}.time.json")
    spent = float(job.seconds(timing_path).get("seconds", 0.0))
    panels = PanelStore(job.path("panels", f"{spec.name}.npz"), int(config.num_panels), load=job.writer)
    reader = ClickMeReader(run.reader_cfg)
    limit = run.limit
    total = reader.num_batches if limit is None else min(reader.num_batches, math.ceil(limit / run.per_process))
    num_records = sum(reader.record_counts) if limit is None else min(sum(reader.record_counts), limit)
    vfiles = run.variants.files if run.variants is not None and run.variants.files else {}
    vreaders = {v: ClickMeReader(dataclasses.replace(run.reader_cfg, files=tuple(fs))) for v, fs in vfiles.items()}
    fn = task.batch_fn(model, run.cue is not None)
    evaluator = Evaluator(
        batch_fn=lambda params, b: fn(params, b["image"], b["heatmap"], b["label"], b["index"], b["mask"],
                                      b["variants"]),
        inputs=("image", "heatmap", "label", "index", "mask", "variants"),
        rows=lambda meta, host: task.rows(spec.name, host, meta, done),
        summarise=lambda rows: task.summarise(spec.name, rows, spent),
        columns=task.per_image_columns, device_only=(PICTURE_PREFIX,))
    pictures_at = jax.jit(lambda out, pos: {k: v[pos] for k, v in out.items() if k.startswith(PICTURE_PREFIX)},
                          out_shardings=parallel.replicated(run.mesh))
    entry = {"path": spec.path, "fingerprint": fp}
    bar = tqdm(total=total, desc=spec.name, unit="batch", disable=not (run.progress and job.writer), file=sys.stderr)
    try:
        # Process 0 holds the results: it decides, for every process, whether the batch is done.
        batches = run_batches(evaluator, variables, _batches(run, reader, vreaders, total), run.mesh,
                              skip=lambda meta: all(int(j) in done for j in meta["index"][meta["mask"]]))
        mark = time.perf_counter()
        for result in batches:
            if result.skipped:
                bar.update(1)
                mark = time.perf_counter()
                continue
            meta, host = result.meta, result.host
            at = np.clip(meta["index"], 0, len(run.cue.cue) - 1) if run.cue is not None else None
            meta["cue"] = run.cue.cue[at] if run.cue is not None else np.full(len(meta["index"]), cue_swap.NO_CUE)
            meta["swap_cue"] = run.cue.swap[at] if vreaders else np.full(len(meta["index"]), cue_swap.NO_CUE)
            meta["num_records"] = num_records
            rows = evaluator.rows(meta, host)
            _keep_pictures(run, task, panels, pictures_at, result, meta, host)
            if job.writer:
                if panels.changed:  # pictures first: a batch whose rows are kept has its pictures kept
                    store.make_dirs(job.path("panels"))
                    panels.save()
                job.append(per_image, rows, spec.name, entry)
                spent += time.perf_counter() - mark
                job.save_seconds(timing_path, {"seconds": spent})
            mark = time.perf_counter()
            done.update(int(r["img"]) for r in rows)
            bar.update(1)
    finally:
        bar.close()
    # In record order: the bootstrap's draws index the values, so the same rows give the same intervals
    # whatever order the batches (or the processes' slices of them) were written in.
    rows = sorted(per_image.rows.values(), key=lambda r: int(r["img"])) if job.writer else []
    row = evaluator.summarise(rows)
    if job.writer:
        _write_summary(run, job, spec, row, panels)
    return row, (panels if job.writer else None)


def _keep_pictures(run, task, panels, pictures_at, result, meta, host) -> None:
    """Pictures of the eligible images that enter the first ``num_panels`` in record order; process 0
    decides, every process takes part in the gather."""
    wanted = [k for k in np.argsort(meta["index"], kind="stable")
              if meta["mask"][k] and task.keep_picture(host, k) and panels.wants(int(meta["index"][k]))]
    pos = np.full((max(int(run.config.num_panels), 1),), -1, np.int32)
    pos[:min(len(wanted), len(pos))] = wanted[:len(pos)]
    pos = parallel.from_process_0(pos)
    if np.any(pos >= 0):
        pics = parallel.to_host(pictures_at(result.device, np.maximum(pos, 0)))
        for j, k in enumerate(int(q) for q in pos if q >= 0):
            panels.offer({"img": int(meta["index"][k]), "label": int(meta["label"][k]),
                          **{key: plain_scalar(np.asarray(host[key][k])) for key in host},
                          **{key[len(PICTURE_PREFIX):]: np.asarray(v[j]) for key, v in pics.items()}})


def _write_summary(run, job, spec, row, panels) -> None:
    """Process 0: the model's row into ``summary.csv`` (rows of models not in this run kept), and the
    figures whose data changed."""
    task = run.task
    summary_path = job.path("summary.csv")
    by_name = {r["model"]: r for r in store.read_csv(summary_path)}
    by_name[spec.name] = {c: store.fmt(row[c]) for c in task.summary_columns}
    ordered = [by_name[n] for n in run.order if n in by_name] + [r for n, r in by_name.items() if n not in run.order]
    changed = job.write_csv(summary_path, task.summary_columns, ordered)
    if panels.items and job.draw(job.path("panels", f"{spec.name}.png"), changed,
                                 lambda path: task.plot_panels(path, spec.name, panels.panels(), run.cue is not None)):
        panels.drawn = True
    job.draw(job.path(task.summary_figure), changed, lambda path: task.plot_summary(path, ordered))
