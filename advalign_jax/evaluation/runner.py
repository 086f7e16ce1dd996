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

from advalign_jax import parallel
from advalign_jax.errors import AdvalignError, ConfigError
from advalign_jax.evaluation.results import PerImageFile, check_workdir, merge_summary

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
    per-image arrays (``index``: record index; ``mask``: real, not padding) (keys starting with ``picture_`` hold images for panels); ``rows(name, host, meta, done)``
    -> per-image CSV rows; ``summarise(name, rows, seconds)`` -> the summary row; ``keep_picture(host,
    k)`` says whether image k of a batch is worth a panel; ``plot_panels(path, name, panels)`` and
    ``plot_summary(workdir, summary_rows)`` draw.
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


def load_models(config, specs: Sequence[ModelSpec]) -> list:
    """(spec, model, variables) for every spec; every checkpoint is checked before anything runs."""
    from advalign_jax.models import load_model  # pylint: disable=import-outside-toplevel

    loaded = []
    for spec in specs:
        model, variables = load_model(spec.path, arch=spec.arch, dtype=config.dtype)
        if model.num_classes != config.data.num_classes:
            raise AdvalignError(f"{spec.path}: the model has {model.num_classes} classes but the data "
                                f"has {config.data.num_classes} (data.num_classes)")
        loaded.append((spec, model, variables))
    return loaded


def run(config, task: Task, progress: bool = True) -> list[dict]:
    """Evaluates every model of ``config.models``; returns the summary rows."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    from advalign_jax.data.config_block import reader_config  # pylint: disable=import-outside-toplevel
    from advalign_jax.data.reader import ClickMeReader  # pylint: disable=import-outside-toplevel

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
    if writer:
        check_workdir(workdir, config, task.result_keys)
        os.makedirs(os.path.join(workdir, "per_image"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "panels"), exist_ok=True)
    limit: Optional[int] = config.max_images if config.max_images >= 0 else None
    summary = []
    for spec, model, variables in loaded:
        per_image = PerImageFile(os.path.join(workdir, "per_image", f"{spec.name}.csv"), task.per_image_columns)
        timing_path = os.path.join(workdir, "per_image", f"{spec.name}.time.json")
        spent = json.load(open(timing_path))["seconds"] if os.path.exists(timing_path) else 0.0
        reader = ClickMeReader(reader_config(config.data, per_process_batch=per_process))
        total = reader.num_batches if limit is None else min(reader.num_batches, math.ceil(limit / per_process))
        num_records = sum(reader.record_counts) if limit is None else min(sum(reader.record_counts), limit)
        batch_fn = task.make_batch_fn(model)
        pictures_of = jax.jit(lambda out, n: {k: v[:n] for k, v in out.items() if k.startswith(PICTURE_PREFIX)},
                              static_argnums=1, out_shardings=parallel.replicated(mesh))
        params = parallel.replicate(variables, mesh)
        panels: list = []
        bar = tqdm(total=total, desc=spec.name, unit="batch", disable=not (progress and writer), file=sys.stderr)
        for batch in reader.take(total):
            mask = batch["mask"] & (batch["index"] < limit) if limit is not None else batch["mask"]
            if parallel.all_processes(all(int(j) in per_image.rows for j in batch["index"][mask])):
                bar.update(1)
                continue
            start = time.perf_counter()
            inputs = parallel.shard_batch({**{k: batch[k] for k in ("image", "heatmap", "label")},
                                           "index": batch["index"].astype(np.int32), "mask": mask}, mesh)
            out = batch_fn(params, inputs["image"], inputs["heatmap"], inputs["label"], inputs["index"],
                           inputs["mask"])
            host = parallel.to_host({k: v for k, v in out.items() if not k.startswith(PICTURE_PREFIX)})
            meta = parallel.to_host({"mask": mask, "index": batch["index"], "label": batch["label"]})
            meta["num_records"] = num_records
            rows = task.rows(spec.name, host, meta, set(per_image.rows))
            if writer:
                per_image.append(rows)
                spent += time.perf_counter() - start
                with open(timing_path + ".tmp", "w") as f:
                    json.dump({"seconds": spent}, f)
                os.replace(timing_path + ".tmp", timing_path)
            if len(panels) < config.num_panels:  # every process takes part: the pictures are gathered
                pics = pictures_of(out, min(config.num_panels, global_batch))
                n = len(next(iter(pics.values())))
                for k in np.flatnonzero(meta["mask"][:n]):
                    if len(panels) < config.num_panels and task.keep_picture(host, k):
                        panels.append({"img": int(meta["index"][k]), "label": int(meta["label"][k]),
                                       **{key: host[key][k] for key in host},
                                       **{key[len(PICTURE_PREFIX):]: np.asarray(v[k]) for key, v in pics.items()}})
            bar.update(1)
        bar.close()
        row = task.summarise(spec.name, list(per_image.rows.values()), spent)
        summary.append(row)
        if writer:
            if panels:
                task.plot_panels(os.path.join(workdir, "panels", f"{spec.name}.png"), spec.name, panels)
            existing = merge_summary(os.path.join(workdir, "summary.csv"), task.summary_columns, row,
                                     [s.name for s in specs])
            task.plot_summary(workdir, list(existing.values()))
    return summary


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Saves a matplotlib figure atomically and closes it."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig.savefig(path + ".tmp.png", dpi=dpi)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return (float(np.mean(a)), float(np.std(a))) if a.size else (float("nan"), float("nan"))
