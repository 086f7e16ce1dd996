"""Crash points: named places where a run can be made to die on purpose, to test what a crash leaves.

Set ``ADVALIGN_JAX_CRASH_AT=NAME:N`` in a process's environment and it sends itself SIGKILL (no
cleanup, no flush, as ``kill -9`` or a lost machine would) the N-th time it reaches the crash point
NAME (N counts from 1); in a multi-process run ``ADVALIGN_JAX_CRASH_PROCESS=I`` limits that to the
process whose ``JAX_PROCESS_ID`` is I. Unset, every crash point is a dictionary lookup and nothing
else.

Crash points:

- ``checkpoint.data_state``: a training checkpoint's input-stream position is written, its orbax
  checkpoint not yet;
- ``checkpoint.saved``: a training checkpoint is complete, older positions not yet pruned;
- ``rows.torn``: a batch of result rows is half written (the file ends inside a row);
- ``rows.appended``: a batch of result rows is written and synced, nothing after it yet.
"""

from __future__ import annotations

import os
import signal

ENV = "ADVALIGN_JAX_CRASH_AT"
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
