"""The resumable job of ``advalign-jax evaluate-robust`` (``configs/robustness.py``): one model, one
array dataset, the attacks of ``config.attacks``; files in ``config.workdir`` (the module docstring of
:mod:`advalign_jax.evaluation.robustness`; formats in :mod:`advalign_jax.evaluation.robust_io`).

Crash safety, as for the ClickMe evaluations (:mod:`advalign_jax.evaluation.runner`,
:mod:`advalign_jax.store`): one run per workdir (a lock naming its holder's PID); per-example rows
appended whole and synced batch by batch, a torn or damaged row dropped on reopening and recomputed;
``config.json`` (the values of :data:`RESULT_KEYS`) and ``models.json`` (the checkpoint's path and
fingerprint) written with the first result, so a rerun over another configuration or another
checkpoint is refused in one line while a workdir without results takes a new one; ``summary.csv`` and
``time.json`` replaced atomically, ``summary.csv`` only when its text changes (a finished rerun
writes no result file). Every process computes; process 0 alone reads and writes the files and
decides which batches are done.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np

from advalign_jax import parallel, store
from advalign_jax.attacks import autoattack as AA
from advalign_jax.errors import AdvalignError, ConfigError, DataError
from advalign_jax.evaluation import robust_io as io
from advalign_jax.evaluation import robustness as R
from advalign_jax.evaluation.robust_attacks import _clip, _fit_to_classes, attacks_from_config

# Config keys whose values decide the results (a resumed run must agree on them). The model is tied to
# the workdir by its fingerprint (models.json), not by its path: a moved checkpoint resumes.
RESULT_KEYS = ("arch", "data", "attacks", "eps", "pgd", "apgd", "fab", "square", "autoattack", "clip", "dtype",
               "seed")
ROWS_FILE = "per_example.csv"

_MODELS: dict = {}


def _shared(model):
    """One Model object per architecture (equal flax modules), so that :func:`make_batch_fn`'s cached
    compiled function serves every run of a process with the same architecture and batch shape."""
    try:
        return _MODELS.setdefault(model.module, model)
    except TypeError:  # an unhashable module: nothing shared
        return model


def _embedded_arrays(limit: Optional[int], image_size: int = 224) -> tuple:
    """The embedded synthetic ClickMe validation records (10 classes) as arrays, read at ``image_size``
    (the reader's bilinear resize, as for the ClickMe evaluations). Every process reads every record
    (:func:`~advalign_jax.evaluation.robustness.iter_batches` takes the whole dataset everywhere)."""
    from advalign_jax.data import embedded_files  # pylint: disable=import-outside-toplevel
    from advalign_jax.data.reader import ClickMeReader, ReaderConfig  # pylint: disable=import-outside-toplevel

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
    from advalign_jax.data.images import load_arrays  # pylint: disable=import-outside-toplevel

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
    from advalign_jax.models import load_model  # pylint: disable=import-outside-toplevel

    model, variables = load_model(config.model_dir, arch=config.arch or None, dtype=config.dtype)
    for a in attacks:  # loss / class-count mismatches before anything is written
        for _, cfg in getattr(a, "stages", ()):
            _fit_to_classes(cfg, model.num_classes, a.name)
    options = {k: v for k, v in model.options.items() if k != "dtype"}
    entry = {"path": config.model_dir, "fingerprint": store.fingerprint(model.name, options, variables)}
    return model, variables, entry


def _has_rows(path: str) -> bool:
    """Whether ``path`` holds a whole line after its header (a result)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n") >= 2
    except OSError:
        return False


def _check_model(record: store.RunRecord, name: str, entry: dict, has_results: bool) -> None:
    """A robustness workdir holds one model's results: they are refused when another checkpoint made
    them, whatever its name (a workdir of an earlier version without ``models.json`` is checked by
    the ``model_dir`` its ``config.json`` names)."""
    saved = store.read_json(record.models_path, {}) or {}
    if not saved and has_results:
        old = (store.read_json(record.path, {}) or {}).get("model_dir")
        if old and os.path.normpath(old) != os.path.normpath(entry["path"]):
            raise AdvalignError(f"{record.workdir} holds results of the checkpoint {old}, but {entry['path']} is "
                                "another model; use another --config.workdir or remove that folder")
    record.check_models({n: entry for n in {name, *saved}}, lambda _: has_results,
                        advice="use another --config.workdir or remove that folder")


def _open_rows(workdir: str, attacks, record: store.RunRecord, name: str, entry: dict, log) -> store.RowFile:
    """Process 0: checks the workdir's record against this run, then opens the per-example rows."""
    path = os.path.join(workdir, ROWS_FILE)
    has_results = _has_rows(path)
    record.check(has_results=has_results)
    _check_model(record, name, entry, has_results)
    return store.RowFile(path, io.per_example_columns(attacks), key="img", validate=io.row_validator(attacks),
                         log=log)


def _done_mask(rows: Optional[store.RowFile], n: int) -> np.ndarray:
    """Process 0's record of the examples already computed, on every process."""
    done = np.zeros(n, bool)
    if rows is not None:
        for img in rows.rows:
            if int(img) < n:
                done[int(img)] = True
    return np.array(parallel.from_process_0(done), bool)


def _compute(config, attacks, apply_fn, variables, x, y, mesh, rows, record, name, entry, progress) -> tuple:
    """Runs the batches not done yet; process 0 appends their rows. Returns ``(seconds, stage seconds)``
    including those of the earlier runs."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    writer = rows is not None
    timing_path = os.path.join(config.workdir, "time.json")
    spent, stage_seconds = io.load_times(timing_path) if writer else (0.0, {})
    done = _done_mask(rows, len(y))
    bar = tqdm(total=len(y), initial=int(done.sum()), desc="robustness", unit="img",
               disable=not (progress and writer), file=sys.stderr)
    try:
        start = time.perf_counter()
        batches = R.iter_batches(apply_fn, variables, x, y, attacks, int(config.batch_size),
                                 jax.random.PRNGKey(int(config.seed)), mesh, skip=lambda idx: bool(done[idx].all()),
                                 chunks=int(config.stage_chunks))
        for index, rec, seconds in batches:
            new = [r for r in io.csv_rows(index, rec, attacks) if not done[r["img"]]]
            R.add_seconds(stage_seconds, seconds)
            if writer:
                record.commit()
                record.commit_model(name, entry)
                rows.append(new)
                spent += time.perf_counter() - start
                start = time.perf_counter()
                io.save_times(timing_path, spent, stage_seconds)
            done[index] = True
            bar.update(len(new))
    finally:
        bar.close()
    return spent, stage_seconds


def _summary(config, attacks, y, rows: store.RowFile, checks: dict, spent: float, stage_seconds: dict) -> list:
    """Process 0: the summary rows from the per-example rows of the dataset's examples; writes
    ``summary.csv`` when it changed."""
    missing = [i for i in range(len(y)) if str(i) not in rows.rows]
    if missing:
        raise AdvalignError(f"{rows.path}: {len(missing)} examples missing after the run (first: {missing[0]})")
    table = [rows.rows[str(i)] for i in range(len(y))]
    if any(int(r["label"]) != int(y[i]) for i, r in enumerate(table)):
        raise AdvalignError(f"{rows.path} holds labels that differ from data.source={config.data.source!r}; "
                            "use another --config.workdir")
    summary = R.summarise(io.arrays_from_csv(table, attacks), attacks, checks, stage_seconds)
    R.warn_all(summary, already=tuple(checks))
    out = io.summary_rows(model_name(config), summary, spent)
    io.write_summary(os.path.join(config.workdir, "summary.csv"), out)
    return out


def evaluate(config, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> list:
    """Runs the job; returns the summary rows on process 0 (``[]`` on the others: every process
    computes, process 0 writes). ``log``: where one-line notices go (default: above the progress bar)."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    parallel.initialize_distributed(bool(config.distributed))
    attacks = attacks_from_config(config)  # config mistakes before anything is loaded
    _check_options(config)
    model, variables, entry = _load_model(config, attacks)
    x, y = load_data(config, model)
    mesh = parallel.make_mesh(devices=jax.devices()[:config.num_devices] if config.num_devices else None)
    writer = jax.process_index() == 0
    name = model_name(config)
    record = store.RunRecord(config.workdir, config, RESULT_KEYS)
    lock = store.WorkdirLock(config.workdir) if writer else None
    try:
        rows = _open_rows(config.workdir, attacks, record, name, entry, log) if writer else None
        apply_fn = _shared(model).apply
        checks = R.pre_checks(apply_fn, variables, x, y, attacks, _clip(config.clip), int(config.batch_size))
        if writer:
            AA.warn(checks)
        spent, stage_seconds = _compute(config, attacks, apply_fn, variables, x, y, mesh, rows, record, name,
                                        entry, progress)
        return _summary(config, attacks, y, rows, checks, spent, stage_seconds) if writer else []
    finally:
        if lock is not None:
            lock.release()
