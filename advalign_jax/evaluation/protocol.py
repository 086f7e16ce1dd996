"""The evaluation protocol: an evaluator, the sources it runs over, and the one loop that runs it.

An :class:`Evaluator` is what an evaluation computes: its compiled per-batch function, the batch keys
that function takes, the outputs that stay on the devices (pictures kept for panels), how a batch's
outputs become rows, the rows' schema, and how rows are summarised. It knows nothing of files,
processes or devices.

A *source* is any iterable of per-process host batches: dicts of NumPy arrays whose leading axis is
this process's slice of the global batch, with ``index`` (each example's position in the dataset) and
``mask`` (False for the padding that fills the last batch, so one compiled function serves every batch
and no example is dropped). :class:`ArraySource` makes them from in-memory arrays; the ClickMe reader
(:class:`advalign_jax.data.reader.ClickMeReader`) yields them from TFRecords.

:func:`run_batches` is the loop every evaluation runs, written once: for each batch it gathers the
batch's ``meta`` (index, mask, label; every process sees the whole global batch), asks ``skip`` (a
resumed run's done batches; process 0 decides for every process), places the inputs on the mesh
(sharded along its data axis; replicated variables), calls the evaluator, gathers the outputs to every
host and times the batch. :func:`evaluate_all` collects every row and summarises them (the trainer's
periodic evaluation); the resumable job that writes rows to disk is :mod:`advalign_jax.evaluation.job`.

Every process runs every batch (collectives need all of them); an example's result does not depend on
its batch mates when the model is in inference mode and its random draws come from its index.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np

from advalign_jax import parallel
from advalign_jax.errors import ConfigError, DataError

META_KEYS = ("index", "mask", "label")


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """What an evaluation computes on one batch.

    ``batch_fn(variables, inputs) -> {name: array}``: per-example outputs (leading axis: the global
    batch), compiled; ``inputs`` holds the batch keys of :attr:`inputs` (global arrays on the mesh).
    ``device_only``: output-name prefixes left on the devices (not gathered to the hosts).
    ``rows(meta, host) -> [row]``: the rows of the batch's real examples (``meta``: the gathered
    ``index``, ``mask``, ``label``; ``host``: the gathered outputs). ``summarise(rows)``: the summary.
    ``columns``: the rows' schema where they are written to a file.
    """

    batch_fn: Callable[[Any, dict], dict]
    inputs: Sequence[str]
    rows: Callable[[dict, dict], list]
    summarise: Callable[[list], Any]
    columns: Sequence[str] = ()
    device_only: Sequence[str] = ()


@dataclasses.dataclass
class BatchResult:
    """One batch of :func:`run_batches`: ``meta`` and ``host`` (gathered NumPy over the global batch),
    ``device`` (every output, still on the devices), ``seconds`` (placement, call and gather);
    ``skipped``: the batch was done already (nothing computed: ``host`` and ``device`` are empty)."""

    meta: dict
    host: dict
    device: dict
    seconds: float
    skipped: bool = False


class ArraySource:
    """In-memory arrays as per-process host batches of ``batch_size`` examples in all.

    ``arrays``: ``{name: array}`` of the same length N. The global batch size is rounded up to a multiple
    of the mesh's data-parallel size and of the process count and capped at what the data needs; batch
    ``b`` holds examples ``b * B .. (b + 1) * B - 1``, each process its contiguous block, the last batch
    padded by repeating the last example with ``mask`` False. Every process passes the whole arrays.
    """

    def __init__(self, arrays: dict, batch_size: int, mesh=None, label_key: str = "y"):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        n = {len(v) for v in self.arrays.values()}
        if len(n) != 1:
            raise DataError(f"the arrays hold different numbers of examples: "
                            f"{ {k: v.shape for k, v in self.arrays.items()} }")
        self.n = n.pop()
        if self.n == 0:
            raise DataError("no examples to evaluate")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        procs = jax.process_count()
        if mesh is None and procs > 1:
            raise ConfigError("a multi-process evaluation needs a mesh")
        self.batch_size = round_batch(min(batch_size, self.n), mesh)
        self.label_key = label_key
        self.num_batches = math.ceil(self.n / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def batch_index(self, b: int) -> np.ndarray:
        """The dataset positions of the real examples of global batch ``b``."""
        return np.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.n))

    def __iter__(self) -> Iterator[dict]:
        per_process = self.batch_size // jax.process_count()
        pid = jax.process_index()
        for b in range(self.num_batches):
            local = np.arange(b * self.batch_size, (b + 1) * self.batch_size)[pid * per_process:(pid + 1) * per_process]
            take = np.minimum(local, self.n - 1)
            batch = {k: v[take] for k, v in self.arrays.items()}
            batch["index"] = local.astype(np.int32)
            batch["mask"] = local < self.n
            if self.label_key in batch:
                batch["label"] = batch[self.label_key]
            yield batch


def round_batch(global_batch: int, mesh=None) -> int:
    """``global_batch`` rounded up to a multiple of the mesh's data-parallel size and of the process
    count (every device and process gets the same share)."""
    unit = math.lcm(parallel.data_parallel_size(mesh), jax.process_count()) if mesh is not None else 1
    return math.ceil(global_batch / unit) * unit


def run_batches(evaluator: Evaluator, variables, source: Iterable[dict], mesh=None,
                skip: Optional[Callable[[dict], bool]] = None, replicated: bool = False) -> Iterator[BatchResult]:
    """Runs ``evaluator`` over every batch of ``source`` (the module docstring); yields a
    :class:`BatchResult` per batch, in source order.

    ``mesh``: shard each batch over its data axis and replicate ``variables`` on it (``replicated``:
    they are already); without a mesh the arrays go to the default device as they are (one process).
    ``skip(meta) -> bool``: whether the batch is done already; process 0's answer holds everywhere.
    """
    if mesh is not None and not replicated:
        variables = parallel.replicate(variables, mesh)
    for batch in source:
        meta = parallel.to_host({k: batch[k] for k in META_KEYS if k in batch})
        if skip is not None and bool(parallel.from_process_0(np.asarray(bool(skip(meta))))):
            yield BatchResult(meta, {}, {}, 0.0, skipped=True)
            continue
        start = time.perf_counter()
        inputs = {k: batch[k] for k in evaluator.inputs}
        inputs = parallel.shard_batch(inputs, mesh) if mesh is not None else inputs
        out = evaluator.batch_fn(variables, inputs)
        host = parallel.to_host({k: v for k, v in out.items()
                                 if not any(k.startswith(p) for p in evaluator.device_only)})
        yield BatchResult(meta, host, out, time.perf_counter() - start)


def evaluate_all(evaluator: Evaluator, variables, source: Iterable[dict], mesh=None) -> Any:
    """Every row of ``evaluator`` over ``source``, summarised (``evaluator.summarise(rows)``)."""
    rows = []
    for result in run_batches(evaluator, variables, source, mesh):
        rows += evaluator.rows(result.meta, result.host)
    return evaluator.summarise(rows)


def real(meta: dict) -> np.ndarray:
    """Positions of the real (unpadded) examples of a gathered batch."""
    return np.flatnonzero(meta["mask"])
