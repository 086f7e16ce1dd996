"""The resumable job of ``advalign-jax evaluate-robust`` (``configs/robustness.py``): one model, one
array dataset, the attacks of ``config.attacks``, in one workdir.

Files in ``config.workdir``: ``per_example.csv`` (:func:`~advalign_jax.evaluation.robust.files.
per_example_columns`), written batch by batch; ``summary.csv`` (one row per attack, per cascade stage
and ``all``: ``model,attack,stage,norm,eps,num_examples,clean_accuracy,robust_accuracy,
adversarial_accuracy,max_perturbation,wall_time_s,stage_time_s,checks``); ``config.json`` and
``models.json`` (the config without its changeable keys, :data:`CHANGEABLE`, and the checkpoint's
fingerprint, written with the first result); ``time.json``.

The job is an :class:`~advalign_jax.evaluation.job.EvaluationJob` around the robust evaluator
(:func:`~advalign_jax.evaluation.robust.evaluator.robust_evaluator`): one run per workdir (a lock naming
its holder's PID); rows appended whole and synced, a torn or damaged row dropped on reopening and
recomputed; a rerun over another configuration, or over another checkpoint whatever its name (a
workdir holds one model's results; a moved checkpoint resumes), refused in one line; ``summary.csv``
written only when its text changes (a finished rerun writes no result file). Results do not depend on
the batching, so a resumed run with another ``batch_size`` gives the same files, and ``max_examples``
may grow between runs (the rows already computed are reused). Every process computes; process 0 alone
reads and writes the files and decides which batches are done.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

from advalign_jax import parallel
from advalign_jax.attacks import autoattack as AA
from advalign_jax.data import embedded_files
from advalign_jax.data.images import load_arrays
from advalign_jax.data.reader import ClickMeReader, ReaderConfig
from advalign_jax.errors import AdvalignError, ConfigError, DataError
from advalign_jax.evaluation.job import EvaluationJob
from advalign_jax.evaluation.protocol import ArraySource, real, run_batches
from advalign_jax.evaluation.robust.attacks import attacks_from_config, clip_range, fit_to_classes
from advalign_jax.evaluation.robust.evaluator import robust_evaluator
from advalign_jax.evaluation.robust.files import (
    per_example_columns, row_validator, summary_rows, summary_text, times_from_json, times_to_json)
from advalign_jax.evaluation.robust.summary import pre_checks, warn_all
from advalign_jax.models import fingerprint, load_model

# Config keys a resumed run may change (advalign_jax.run_record): where and how fast it runs, and how many
# examples it covers. The model is tied to the workdir by its fingerprint (models.json), not by its path.
CHANGEABLE = ("model_dir", "max_examples", "batch_size", "stage_chunks", "workdir", "distributed", "num_devices")
ROWS_FILE = "per_example.csv"

_MODELS: dict = {}


def _shared(model):
    """One Model object per architecture (equal flax modules), so that the cached compiled attack
    sequence serves every run of a process with the same architecture and batch shape."""
    try:
        return _MODELS.setdefault(model.module, model)
    except TypeError:  # an unhashable module: nothing shared
        return model


def _embedded_arrays(limit: Optional[int], image_size: int = 224) -> tuple:
    """The embedded synthetic ClickMe validation records (10 classes) as arrays, read at ``image_size``
    (the reader's bilinear resize, as for the ClickMe evaluations). Every process reads every record
    (every process passes the whole dataset to its :class:`~advalign_jax.evaluation.protocol.ArraySource`)."""
    images, labels = [], []
    for batch in ClickMeReader(ReaderConfig(files=tuple(embedded_files("val")), batch_size=32, num_classes=10,
                                           image_size=image_size), process_index=0, process_count=1):
        keep = np.asarray(batch["mask"], bool)
        images.append(np.asarray(batch["image"])[keep])
        labels.append(np.asarray(batch["label"])[keep])
        if limit is not None and sum(len(v) for v in labels) >= limit:
            break
    x, y = np.concatenate(images), np.concatenate(labels).astype(np.int32)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def load_data(config, model) -> tuple:
    """The configured arrays, checked against the model (input shape, label range)."""
    d = config.data
    limit = int(config.max_examples) if config.max_examples > 0 else None
    if d.source == "embedded":
        x, y = _embedded_arrays(limit, int(model.input_shape[0]))  # read at the model's size
    else:
        x, y = load_arrays(d.source, d.split, d.data_dir or None, limit)
    if len(y) == 0:
        raise DataError(f"data.source={d.source!r} split {d.split!r} holds no examples")
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ConfigError(f"data.source={d.source!r} gives inputs of shape {tuple(x.shape[1:])} but the model "
                          f"takes {tuple(model.input_shape)}")
    if int(y.max()) >= model.num_classes or int(y.min()) < 0:
        raise DataError(f"data.source={d.source!r} has labels in [{int(y.min())}, {int(y.max())}] but the model "
                        f"has {model.num_classes} classes")
    return x, y


def model_name(config) -> str:
    """The model's name in ``summary.csv`` and ``models.json``: its directory's base name."""
    return os.path.basename(os.path.normpath(config.model_dir))


def _check_options(config) -> None:
    """The options checked before anything is loaded."""
    if int(config.batch_size) < 1:
        raise ConfigError(f"batch_size must be positive, got {config.batch_size}")
    if int(config.stage_chunks) < 1:
        raise ConfigError(f"stage_chunks must be positive, got {config.stage_chunks}")
    if not config.model_dir:
        raise ConfigError("config.model_dir is empty: give a model directory (from `advalign-jax train` or "
                          "`advalign-jax convert`), e.g. --config.model_dir=checkpoints/MODEL")


def _load_model(config, attacks) -> tuple:
    """``(model, variables, models.json entry)``; the attacks' class-count needs checked."""
    model, variables = load_model(config.model_dir, arch=config.arch or None, dtype=config.dtype)
    for a in attacks:  # loss / class-count mismatches before anything is written
        for _, cfg in getattr(a, "stages", ()):
            fit_to_classes(cfg, model.num_classes, a.name)
    options = {k: v for k, v in model.options.items() if k != "dtype"}
    entry = {"path": config.model_dir, "fingerprint": fingerprint(model.name, options, variables)}
    return model, variables, entry


def _has_rows(path: str) -> bool:
    """Whether ``path`` holds a whole line after its header (a result)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n") >= 2
    except OSError:
        return False


def evaluate(config, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> list:
    """Runs the job; returns the summary rows on process 0 (``[]`` on the others: every process
    computes, process 0 writes). ``log``: where one-line notices go (default: above the progress bar)."""
    mesh = parallel.job_mesh(config)
    attacks = attacks_from_config(config)  # config mistakes before anything is loaded
    _check_options(config)
    model, variables, entry = _load_model(config, attacks)
    x, y = load_data(config, model)
    name = model_name(config)
    with EvaluationJob(config, CHANGEABLE, log) as job:
        path = job.path(ROWS_FILE)
        if job.writer:  # a workdir holds one model's results: any other checkpoint is refused, whatever its name
            has_results = _has_rows(path)
            job.check(has_results, {n: entry for n in {name, *job.record.saved_models()}}, lambda _: has_results,
                      advice="use another --config.workdir or remove that folder")
        rows = job.open_rows(path, per_example_columns(attacks), row_validator(attacks))
        apply_fn = _shared(model).apply
        checks = pre_checks(apply_fn, variables, x, y, attacks, clip_range(config.clip), int(config.batch_size))
        if job.writer:
            AA.warn(checks)
        time_path = job.path("time.json")
        spent, stage_seconds = times_from_json(job.seconds(time_path))
        source = ArraySource({"x": x, "y": y}, int(config.batch_size), mesh)
        evaluator = robust_evaluator(apply_fn, attacks, jax.random.PRNGKey(int(config.seed)), source, mesh,
                                     int(config.stage_chunks), checks=checks, seconds=stage_seconds)
        done = job.done(rows, len(y))
        bar = tqdm(total=len(y), initial=int(done.sum()), desc="robustness", unit="img",
                   disable=not (progress and job.writer), file=sys.stderr)
        try:
            start = time.perf_counter()
            for result in run_batches(evaluator, variables, source, mesh,
                                      skip=lambda meta: bool(done[meta["index"][real(meta)]].all())):
                if result.skipped:
                    continue
                new = [r for r in evaluator.rows(result.meta, result.host) if not done[r["img"]]]
                job.append(rows, new, name, entry)
                spent += time.perf_counter() - start
                start = time.perf_counter()
                job.save_seconds(time_path, times_to_json(spent, stage_seconds))
                done[result.meta["index"][real(result.meta)]] = True
                bar.update(len(new))
        finally:
            bar.close()
        return _summary(config, job, evaluator, y, rows, checks, spent) if job.writer else []


def _summary(config, job, evaluator, y, rows, checks: dict, spent: float) -> list:
    """Process 0: the summary rows from the per-example rows of the dataset's examples; writes
    ``summary.csv`` when it changed."""
    missing = [i for i in range(len(y)) if str(i) not in rows.rows]
    if missing:
        raise AdvalignError(f"{rows.path}: {len(missing)} examples missing after the run (first: {missing[0]})")
    table = [rows.rows[str(i)] for i in range(len(y))]
    if any(int(r["label"]) != int(y[i]) for i, r in enumerate(table)):
        raise AdvalignError(f"{rows.path} holds labels that differ from data.source={config.data.source!r}; "
                            "use another --config.workdir")
    summary = evaluator.summarise(table)
    warn_all(summary, already=tuple(checks))
    out = summary_rows(model_name(config), summary, spent)
    job.write_text(job.path("summary.csv"), summary_text(out))
    return out
