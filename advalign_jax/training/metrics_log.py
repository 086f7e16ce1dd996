"""The trainer's metrics: ``metrics.csv`` (one row per logged step) and TensorBoard.

- ``metrics.csv``: rows appended as whole lines (synced); the file is rewritten (atomically) only when a
  new metric adds a column or, on resume, when rows logged after the checkpoint being resumed must go
  (so a resumed run has each step once) or a torn last line must go.
- TensorBoard (``WORKDIR/tensorboard/``): every logged value as a scalar summary through
  ``tf.summary`` (:func:`advalign_jax.data.tf_env.import_tf`: TensorFlow with accelerators hidden),
  flushed at each logged step; ``tensorboard --logdir WORKDIR`` shows the curves.

Process 0 writes; the other processes' logs are disabled.
"""

from __future__ import annotations

import csv
import io
import os

from advalign_jax import store
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import writing


class MetricsLog:
    """``metrics.csv`` + TensorBoard of one training workdir, positioned at ``resume_step``."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.csv")
        self.columns: list[str] = ["step"]
        self._summaries = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            whole = data[:data.rfind(b"\n") + 1].decode(errors="replace")
            rows = list(csv.DictReader(io.StringIO(whole)))
            keep = [r for r in rows if _step_of(r) is not None and _step_of(r) <= resume_step]
            self.columns = list(csv.DictReader(io.StringIO(whole)).fieldnames or ["step"])
            if len(keep) != len(rows) or len(whole) != len(data):
                store.write_csv(self.path, self.columns, keep)
        folder = os.path.join(workdir, "tensorboard")
        store.make_dirs(folder)
        tf = import_tf()
        with writing(folder):
            self._summaries = tf.summary.create_file_writer(folder)
        self._tf = tf
        self._folder = folder

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: f"{v:.6g}" for k, v in values.items()}}
        new = [k for k in sorted(values) if k not in self.columns]
        if new or not os.path.exists(self.path):
            old = store.read_csv(self.path) if os.path.exists(self.path) else []
            self.columns = self.columns + new
            store.write_csv(self.path, self.columns, [*old, row])
        else:
            with writing(self.path), open(self.path, "a", newline="") as f:
                f.write(store.csv_text([[row.get(c, "") for c in self.columns]]))
                f.flush()
                os.fsync(f.fileno())
        with writing(self._folder), self._summaries.as_default(step=int(step)):
            for k, v in values.items():
                self._tf.summary.scalar(k, float(v))
            self._summaries.flush()

    def last_values(self) -> dict:
        rows = store.read_csv(self.path) if self.enabled else []
        out = {}
        for r in rows:
            out.update({k: float(v) for k, v in r.items() if k != "step" and v not in ("", None)})
        return out


def _step_of(row: dict):
    try:
        return int(float(row["step"]))
    except (KeyError, TypeError, ValueError):
        return None
