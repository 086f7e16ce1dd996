"""Resumable runs whose results are images: rows in a row file, the images in part files beside it.

Both ``synthesize`` and ``construct`` compute one image (or a few) per *item* (a class sample, a
training image, a unit's seed). :func:`run_items` runs an item function over every item with the
evaluation protocol (:func:`advalign_jax.evaluation.protocol.run_batches`: padded batches sharded over
the mesh, gathered to every host) inside an :class:`~advalign_jax.evaluation.job.EvaluationJob`: for
each batch, process 0 first writes the batch's arrays to ``parts/part-FIRST.npz`` (atomically), then
appends its rows; so every row on disk has its images, a crash leaves whole parts and whole rows, and a
rerun skips the batches whose rows are all there. :func:`assemble` reads the parts back into one array
per output, in item order, and refuses an item without its images.

An item's random draws come from ``fold_in(PRNGKey(seed), item)``, so a result does not depend on the
batching, the device count or a resume.
"""

from __future__ import annotations

import glob
import io
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from advalign_jax import store
from advalign_jax.errors import DataError
from advalign_jax.evaluation.protocol import ArraySource, Evaluator, real, run_batches


def _savez(path: str, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)


def l2_distance(a, b) -> np.ndarray:
    """``||a_i - b_i||_2`` per example of two (N, ...) arrays, in float64."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return np.sqrt((d.reshape(len(d), -1) ** 2).sum(axis=1))


class _GatheringSource(ArraySource):
    """:class:`ArraySource` whose batches also hold ``table[batch[index_key]]`` under each name of
    ``gather`` (``{name: (table, index_key)}``): rows of a large array looked up per batch, not copied
    per item."""

    def __init__(self, arrays: dict, gather: dict, batch_size: int, mesh):
        super().__init__(arrays, batch_size, mesh)
        self.gather = gather

    def __iter__(self):
        for batch in super().__iter__():
            for name, (table, index_key) in self.gather.items():
                batch[name] = table[batch[index_key]]
            yield batch


def save_arrays(path: str, arrays: dict) -> None:
    """``numpy.savez`` of ``arrays`` written atomically (the old file or the new, never half)."""
    store.make_dirs(os.path.dirname(path) or ".")
    _savez(path, arrays)


def assemble(parts_dir: str, n: int, keys: Sequence[str]) -> dict:
    """``{key: (n, ...)}`` from the part files of ``parts_dir``, in item order; one line naming the first
    item whose images no part holds."""
    out: dict = {}
    have = np.zeros(n, bool)
    for path in sorted(glob.glob(os.path.join(parts_dir, "part-*.npz"))):
        try:
            with np.load(path) as part:
                items = part["item"].astype(np.int64)
                for k in keys:
                    if k not in out:
                        out[k] = np.zeros((n,) + part[k].shape[1:], part[k].dtype)
                    out[k][items] = part[k]
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path}: not a readable part file ({err}); delete it and rerun to recompute its "
                            f"items") from None
        have[items] = True
    if not have.all():
        raise DataError(f"{parts_dir}: no part file holds the images of item {int(np.flatnonzero(~have)[0])}; "
                        "rerun the command to compute them")
    return out


def run_items(job, mesh, variables, arrays: dict, batch_fn: Callable, inputs: Sequence[str], outputs: Sequence[str],
              rows_fn: Callable[[np.ndarray, dict], list], columns: Sequence[str], rows_path: str, parts_dir: str,
              batch_size: int, name: str, entry: dict, desc: str, progress: bool = True,
              validate: Optional[Callable] = None, gather: Optional[dict] = None) -> tuple:
    """Runs ``batch_fn(variables, inputs) -> {output: (B, ...)}`` over the items of ``arrays`` (``{key:
    (n, ...)}``; ``item`` is added; ``gather``: ``{name: (table, index_key)}``, inputs looked up per batch
    as ``table[index]``); process 0 keeps ``outputs`` in the part files and
    ``rows_fn(items, host)`` in ``rows_path`` (its ``item`` column the key); returns ``(rows, computed)``:
    the row file's rows (``{}`` on the other processes) and whether this run computed any item (a
    finished run reopened computes none, so its caller need not rewrite what it assembled before)."""
    n = len(next(iter(arrays.values())))
    rows = job.open_rows(rows_path, columns, validate, key="item")
    if job.writer:
        store.make_dirs(parts_dir)
    source = _GatheringSource({"item": np.arange(n, dtype=np.int32), **arrays}, gather or {}, batch_size, mesh)
    evaluator = Evaluator(batch_fn=batch_fn, inputs=tuple(inputs), rows=lambda meta, host: [],
                          summarise=lambda r: r, columns=tuple(columns))
    done = job.done(rows, n)
    computed = False
    bar = tqdm(total=n, initial=int(done.sum()), desc=desc, unit="item", disable=not (progress and job.writer),
               file=sys.stderr)
    try:
        for result in run_batches(evaluator, variables, source, mesh,
                                  skip=lambda meta: bool(done[meta["index"][real(meta)]].all())):
            if result.skipped:
                continue
            keep = real(result.meta)
            items = result.meta["index"][keep]
            host = {k: np.asarray(v)[keep] for k, v in result.host.items()}
            if job.writer:
                _savez(os.path.join(parts_dir, f"part-{int(items[0]):07d}.npz"),
                       {"item": items, **{k: host[k] for k in outputs}})
            new = [r for r in rows_fn(items, host) if not done[int(r["item"])]]
            job.append(rows, new, name, entry)
            done[items] = True
            computed = True
            bar.update(len(new))
    finally:
        bar.close()
    return (rows.rows if rows is not None else {}), computed
