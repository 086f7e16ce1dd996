"""Crash points: named places where a run can be made to die on purpose, to test what a crash leaves.

Set ``ADVALIGN_JAX_CRASH_AT=NAME:N`` in a process's environment and it sends itself SIGKILL (no
cleanup, no flush, as ``kill -9`` or a lost machine would) the N-th time it reaches the crash point
NAME (N counts from 1); in a multi-process run ``ADVALIGN_JAX_CRASH_PROCESS=I`` limits that to the
process whose ``JAX_PROCESS_ID`` is I. The command line calls :func:`install` once at start-up; unset,
nothing is installed and every :func:`crash_point` is a dictionary lookup.

The crash points (use the constants, not the strings):

- :data:`CHECKPOINT_DATA_STATE` (``checkpoint.data_state``): a training checkpoint's input-stream
  position is written, its orbax checkpoint not yet;
- :data:`CHECKPOINT_SAVED` (``checkpoint.saved``): a training checkpoint is complete, older positions
  not yet pruned;
- :data:`ROWS_TORN` (``rows.torn``): a batch of result rows is half written (the file ends inside a
  row): :func:`install` replaces the row file's one write (:meth:`advalign_jax.store.RowFile.write_synced`)
  by one that writes half of its bytes and dies at that visit;
- :data:`ROWS_APPENDED` (``rows.appended``): a batch of result rows is written and synced, nothing
  after it yet.
"""

from __future__ import annotations

import os
import signal

from advalign_jax import store

ENV = "ADVALIGN_JAX_CRASH_AT"
CHECKPOINT_DATA_STATE = "checkpoint.data_state"
CHECKPOINT_SAVED = "checkpoint.saved"
ROWS_TORN = "rows.torn"
ROWS_APPENDED = "rows.appended"
NAMES = (CHECKPOINT_DATA_STATE, CHECKPOINT_SAVED, ROWS_TORN, ROWS_APPENDED)

_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, count = spec.rpartition(":")
    return (name, int(count)) if name and count.isdigit() else None


def reached(name: str) -> bool:
    """True when this is the visit of ``name`` at which the process is to die (counts the visit)."""
    target = _target()
    if target is None or target[0] != name:
        return False
    only = os.environ.get("ADVALIGN_JAX_CRASH_PROCESS")
    if only is not None and only != os.environ.get("JAX_PROCESS_ID", "0"):
        return False
    _counts[name] = _counts.get(name, 0) + 1
    return _counts[name] == target[1]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(name: str) -> None:
    """Dies here if ``ADVALIGN_JAX_CRASH_AT`` names this visit of ``name``."""
    if reached(name):
        die()


def install() -> None:
    """Installs the crash points the environment names into the row files' writes (nothing when
    ``ADVALIGN_JAX_CRASH_AT`` is unset or names a checkpoint point, which the trainer visits itself)."""
    target = _target()
    if target is None:
        return
    if target[0] == ROWS_TORN and not getattr(store.RowFile.write_synced, "torn", False):
        whole = store.RowFile.write_synced

        def torn(f, data: bytes) -> None:
            if reached(ROWS_TORN):  # a write cut short: half the bytes reach the disk, then the process dies
                f.write(data[:len(data) // 2 + 1])
                f.flush()
                die()
            whole(f, data)

        torn.torn = True
        store.RowFile.write_synced = staticmethod(torn)
    if target[0] == ROWS_APPENDED and not store.RowFile.after_append:
        store.RowFile.after_append.append(lambda: crash_point(ROWS_APPENDED))
