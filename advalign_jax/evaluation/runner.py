"""The per-image evaluation loop shared by ``evaluate`` and ``evaluate-clickme``.

For every model of ``config.models``: load and check the checkpoint (all of them before any output),
then over the ClickMe evaluation batches (global arrays on the mesh): skip batches whose images are
already in the model's per-image CSV (resume), run the task's compiled batch function, append the
new rows, keep a few images for panels, and finally rewrite the summary CSV and the plots. Every
process computes; process 0 writes.
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

PICTURE_PREFIX = "picture_"  # batch-function outputs with this prefix are images kept for panels


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

    ``make_batch_fn(model)`` -> jitted ``(variables, images, heatmaps, labels, index, mask) -> dict`` of
    per-image arrays (``index``: record index; ``mask``: real, not padding; keys starting with
    ``picture_`` hold images for panels); ``rows(name, host, meta, done)`` -> per-image CSV rows;
    ``summarise(name, rows, seconds)`` -> the summary row (from the CSV rows, strings);
    ``keep_picture(host, k)`` says whether image k of a batch is worth a panel;
    ``plot_panels(path, name, panels)`` and ``plot_summary(workdir, summary_rows, changed)`` draw
    (``changed``: the summary changed in this run). ``text_columns``: per-image columns that are not
    numbers.
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
    ClickMeReader(reader_cfg).check_not_empty()  # before the workdir is touched
    limit: Optional[int] = config.max_images if config.max_images >= 0 else None

    record = store.RunRecord(workdir, config, task.result_keys)
    files = {}
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
        summary = [_run_model(config, task, mesh, spec, model, variables, fp, files.get(spec.name), record,
                              reader_cfg, per_process, global_batch, limit, progress, writer, specs)
                   for spec, model, variables, fp in loaded]
    finally:
        if lock is not None:
            lock.release()
    return summary


def _run_model(config, task, mesh, spec, model, variables, fp, per_image, record, reader_cfg, per_process,
               global_batch, limit, progress, writer, specs) -> dict:
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
    batch_fn = task.make_batch_fn(model)
    pictures_at = jax.jit(lambda out, pos: {k: v[pos] for k, v in out.items() if k.startswith(PICTURE_PREFIX)},
                          out_shardings=parallel.replicated(mesh))
    params = parallel.replicate(variables, mesh)
    bar = tqdm(total=total, desc=spec.name, unit="batch", disable=not (progress and writer), file=sys.stderr)
    try:
        for batch in reader.take(total):
            mask = batch["mask"] & (batch["index"] < limit) if limit is not None else batch["mask"]
            meta = parallel.to_host({"mask": mask, "index": batch["index"], "label": batch["label"]})
            # Process 0 holds the results: it decides, for every process, whether the batch is done.
            finished = all(int(j) in done for j in meta["index"][meta["mask"]])
            if bool(parallel.from_process_0(np.asarray(finished))):
                bar.update(1)
                continue
            start = time.perf_counter()
            inputs = parallel.shard_batch({**{k: batch[k] for k in ("image", "heatmap", "label")},
                                           "index": batch["index"].astype(np.int32), "mask": mask}, mesh)
            out = batch_fn(params, inputs["image"], inputs["heatmap"], inputs["label"], inputs["index"],
                           inputs["mask"])
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
    rows = list(per_image.rows.values()) if writer else []
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
                task.plot_panels(panel_png, spec.name, panels.panels())
        with store.writing(workdir):
            task.plot_summary(workdir, ordered, changed)
    return row


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


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return (float(np.mean(a)), float(np.std(a))) if a.size else (float("nan"), float("nan"))
