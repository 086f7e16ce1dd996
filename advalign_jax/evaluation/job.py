"""The resumable evaluation job: one workdir, its lock, its record, its row files, its summaries.

Every evaluation command (``evaluate``, ``evaluate-clickme``, ``evaluate-robust``) runs its
evaluator (:mod:`advalign_jax.evaluation.protocol`) inside an :class:`EvaluationJob`, which gives it
the crash-safety of :mod:`advalign_jax.store` and the resume rule of :mod:`advalign_jax.run_record`:

- process 0 alone holds the workdir's lock, reads and writes; every process computes;
- result rows go to :class:`~advalign_jax.store.RowFile` files, appended whole and synced batch by
  batch (a torn or damaged row is dropped on reopening and recomputed); ``config.json`` and
  ``models.json`` are written with the first result (:meth:`EvaluationJob.append`), so a run that
  failed before producing any does not hold its workdir;
- a rerun whose config differs in a key that is not changeable, or that files a model's results under
  a name another checkpoint's results hold, is refused in one line (:meth:`EvaluationJob.check`);
- summaries and figures are rewritten only when they change (a finished run reopened in a read-only
  directory writes nothing); the wall-clock seconds spent are kept across resumed runs
  (:meth:`EvaluationJob.seconds`).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from advalign_jax import parallel, store
from advalign_jax.errors import writing
from advalign_jax.run_record import RunRecord


def default_log(msg: str) -> None:
    """One-line notices, written above the progress bar."""
    tqdm.write(msg, file=sys.stderr)


class EvaluationJob:
    """The workdir of one evaluation run (a context manager: the lock is held inside the block).

    ``changeable``: the config's top-level keys a resumed run may change (:mod:`advalign_jax.run_record`).
    """

    def __init__(self, config, changeable: Sequence[str], log: Optional[Callable[[str], None]] = None):
        self.workdir = config.workdir
        self.writer = jax.process_index() == 0
        self.record = RunRecord(self.workdir, config, changeable)
        self.log = log or default_log
        self._lock: Optional[store.WorkdirLock] = None

    def __enter__(self) -> "EvaluationJob":
        if self.writer:
            self._lock = store.WorkdirLock(self.workdir)
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def open_rows(self, path: str, columns: Sequence[str], validate=None, key: str = "img") -> Optional[store.RowFile]:
        """The row file at ``path`` (process 0; ``None`` elsewhere), its folder made."""
        if not self.writer:
            return None
        store.make_dirs(os.path.dirname(path))
        return store.RowFile(path, columns, key=key, validate=validate, log=self.log)

    def check(self, has_results: bool, models: dict, has_results_of: Callable[[str], bool],
              advice: str = "give it another directory name or use another --config.workdir") -> None:
        """Process 0: refuses the workdir when its results came from another config or, for a name of
        ``models`` ({name: {'path', 'fingerprint'}}), from another checkpoint."""
        if not self.writer:
            return
        self.record.check(has_results=has_results)
        self.record.check_models(models, has_results_of, advice=advice)

    def append(self, rows_file: Optional[store.RowFile], rows: Sequence[dict], name: str, entry: dict) -> None:
        """Process 0: records what made the results (with the first of them), then appends ``rows``."""
        if not self.writer:
            return
        self.record.commit()
        self.record.commit_model(name, entry)
        rows_file.append(rows)

    def done(self, rows_file: Optional[store.RowFile], n: int) -> np.ndarray:
        """(n,) bool on every process: the examples whose rows process 0 holds."""
        mask = np.zeros(n, bool)
        if rows_file is not None:
            for key in rows_file.rows:
                if int(key) < n:
                    mask[int(key)] = True
        return np.array(parallel.from_process_0(mask), bool)

    # ---- summaries, figures, times ----------------------------------------------------------------

    def write_text(self, path: str, text: str) -> bool:
        """Process 0: replaces ``path`` with ``text`` when it changed; returns whether it wrote."""
        return self.writer and store.write_text_if_changed(path, text)

    def write_csv(self, path: str, columns: Sequence[str], rows: Sequence[dict]) -> bool:
        """Process 0: the CSV of ``rows`` (:func:`advalign_jax.store.fmt` values) when it changed."""
        return self.write_text(path, store.csv_text([list(columns)] + [[store.fmt(r.get(c, "")) for c in columns]
                                                                      for r in rows]))

    def draw(self, path: str, changed: bool, draw: Callable[[str], None]) -> bool:
        """Process 0: draws the figure ``path`` when its data changed in this run or it is missing."""
        if not self.writer or not (changed or not os.path.exists(path)):
            return False
        store.make_dirs(os.path.dirname(path) or ".")
        with writing(path):
            draw(path)
        return True

    def seconds(self, path: str) -> dict:
        """The times saved at ``path`` by earlier runs (``{}`` if none, or on other processes)."""
        return (store.read_json(path, {}) or {}) if self.writer else {}

    def save_seconds(self, path: str, value: dict) -> None:
        if self.writer:
            store.atomic_write_json(path, value)
