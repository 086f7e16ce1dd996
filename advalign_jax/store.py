"""The crash-safe results store every long job writes through: whole files, whole rows, one owner.

What a crash (``kill -9``, a full disk, a power cut of the process) can leave, and what is kept:

- **Whole files** (:func:`atomic_write`): summaries, JSON records and figures are written to a
  temporary file of this process, synced, and renamed over the old one: a reader sees the old file or
  the new, never half of one. :func:`write_text_if_changed` writes only when the text differs, so a
  finished run reopened in a read-only directory writes nothing.
- **Whole rows** (:class:`RowFile`): result rows are appended as whole lines in one write, flushed and
  synced, batch by batch. A line without its newline (a write cut short), a row with the wrong number
  of fields or a value that does not parse is dropped when the file is reopened (the file is cut back
  to its last whole line) and recomputed by the resumed run. A row is never written twice.
- **One owner per workdir** (:class:`WorkdirLock`): an exclusive ``flock`` on ``WORKDIR/.lock``, held
  for the run and released by the operating system when the process ends, however it ends. A second
  run on the same workdir stops with one line naming the holder's PID.

What made the results (the config and the checkpoint behind them) is :mod:`advalign_jax.run_record`;
output problems become one line through :mod:`advalign_jax.errors`.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import socket
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from advalign_jax.errors import AdvalignError, OutputError, WorkdirBusy, output_error, writing

def make_dirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` with one-line errors (a file in the way, read-only, full)."""
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise OutputError(f"cannot write into {path}: it is a file, not a directory; use another "
                          "--config.workdir / --out")
    with writing(path):
        os.makedirs(path, exist_ok=True)


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def atomic_write(path: str, write: Callable, binary: bool = False) -> None:
    """Writes a whole file atomically: ``write(f)`` into a temporary file of this process, fsync,
    rename over ``path``. On failure the temporary file is removed and ``path`` keeps its old content."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb" if binary else "w", newline=None if binary else "") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise output_error(path, err) from None


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def read_json(path: str, default=None):
    """A JSON file, or ``default`` when it does not exist; a damaged one is one line."""
    if not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise AdvalignError(f"{path} is damaged ({err}); remove it or use another --config.workdir") from None


def write_text_if_changed(path: str, text: str) -> bool:
    """Replaces ``path`` atomically with ``text`` unless it already holds exactly that text (so a
    finished run reopened in a read-only directory writes nothing); returns whether it wrote."""
    if os.path.exists(path):
        with open(path, newline="") as f:
            if f.read() == text:
                return False
    atomic_write_text(path, text)
    return True


# ----------------------------------------------------------------------------------------------------
# CSV text
# ----------------------------------------------------------------------------------------------------


def fmt(v) -> str:
    """CSV text of a value: floats to 6 significant decimals, NaN as 'nan'."""
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return "nan" if math.isnan(v) else repr(round(v, 6)) if abs(v) >= 1e-4 else f"{v:.6g}"
    return str(v)


def csv_text(rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_csv(path: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """Writes a whole CSV atomically."""
    atomic_write_text(path, csv_text([list(columns)] + [[fmt(r.get(c, "")) for c in columns] for r in rows]))


def read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------
# The workdir lock
# ----------------------------------------------------------------------------------------------------


class WorkdirLock:
    """An exclusive lock on ``WORKDIR/.lock`` for the life of this object (or of the process).

    ``flock`` locks belong to the open file: the operating system drops them when the process dies,
    so a killed run never leaves its workdir locked. The file holds the holder's PID and host, which a
    refused run names.
    """

    def __init__(self, workdir: str, what: str = "--config.workdir"):
        make_dirs(workdir)
        self.path = os.path.join(workdir, ".lock")
        self._fd = None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise output_error(self.path, err) from None
            # A read-only workdir: a finished run may still be reopened (it writes nothing); lock the
            # existing file read-only, or go without where there is none (nothing can be written).
            if not os.path.exists(self.path):
                return
            self._fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(self._fd)
                raise output_error(self.path, err) from None
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise WorkdirBusy(f"{workdir} is in use by another run ({holder}); wait for it to finish or "
                              f"use another {what}") from None
        with contextlib.suppress(OSError):  # a full or read-only disk must not stop a run that can resume
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------------------------------
# Row files
# ----------------------------------------------------------------------------------------------------


class RowFile:
    """A CSV of result rows keyed by ``key`` (e.g. ``img``), appended whole rows at a time.

    Reopening keeps every whole, well-formed row (the first one of a key wins) and cuts the file back to
    its last whole line when the end was torn; it rewrites the file only when a damaged or repeated row
    inside it must go (so a finished run in a read-only directory reopens without writing).
    ``validate(row) -> bool`` may reject rows whose values do not parse.
    """

    def __init__(self, path: str, columns: Sequence[str], key: str = "img",
                 validate: Optional[Callable[[dict], bool]] = None, log=None):
        self.path, self.columns, self.key = path, list(columns), key
        self.rows: dict = {}
        self.dropped = 0
        if not os.path.exists(path):
            return
        if os.path.isdir(path):
            raise OutputError(f"cannot write {path}: it is a directory; use another --config.workdir")
        with open(path, "rb") as f:
            data = f.read()
        whole = data.rfind(b"\n") + 1  # bytes up to the last newline: whole lines only
        torn = len(data) - whole
        text = data[:whole].decode("utf-8", errors="replace")
        lines = text.splitlines()
        if lines and next(csv.reader([lines[0]])) != self.columns:
            raise AdvalignError(f"{path}: not a results file of this run (its header differs); use another "
                                "--config.workdir")
        good, bad = lines[:1], 0
        for line in lines[1:]:
            fields = next(csv.reader([line]), [])
            row = dict(zip(self.columns, fields))
            if len(fields) != len(self.columns) or not _ok(validate, row) or row[key] in self.rows:
                bad += 1
                continue
            self.rows[row[key]] = row
            good.append(line)
        self.dropped = bad + (1 if torn else 0)
        if bad or (lines == [] and whole == 0 and torn):
            atomic_write_text(path, "".join(g + "\n" for g in good) if good else "")
        elif torn:
            with writing(path):
                os.truncate(path, whole)
        if self.dropped and log is not None:
            log(f"{path}: {self.dropped} incomplete or damaged row(s) dropped; they are recomputed")

    def __contains__(self, key) -> bool:
        return str(key) in self.rows

    def append(self, rows: Sequence[dict]) -> None:
        """Appends rows (whole lines, one write, synced); on failure the file is cut back to its old
        length and the rows are not counted as written."""
        rows = [r for r in rows if str(r[self.key]) not in self.rows]
        if not rows:
            return
        formatted = [{c: fmt(r[c]) for c in self.columns} for r in rows]
        header = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        text = csv_text(([self.columns] if header else []) + [[f[c] for c in self.columns] for f in formatted])
        try:
            with open(self.path, "ab") as f:
                start = f.tell()
                try:
                    self.write_synced(f, text.encode())
                except OSError:
                    with contextlib.suppress(OSError):
                        f.truncate(start)
                    raise
        except OSError as err:
            raise output_error(self.path, err) from None
        for f in formatted:
            self.rows[f[self.key]] = f
        for hook in self.after_append:
            hook()

    @staticmethod
    def write_synced(f, data: bytes) -> None:
        """The one write of a batch of rows: all of ``data``, flushed and synced."""
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

    # Called after each whole batch of rows is on disk (the crash tests' ROWS_APPENDED point,
    # :func:`advalign_jax.faults.install`).
    after_append: list = []


def _ok(validate, row) -> bool:
    if validate is None:
        return True
    try:
        return bool(validate(row))
    except (ValueError, KeyError, TypeError):
        return False


def numeric_row(columns: Sequence[str], text_columns: Sequence[str] = ()) -> Callable[[dict], bool]:
    """A validator: every column but ``text_columns`` parses as a number ('nan' allowed) and no text
    column is empty."""
    numeric = [c for c in columns if c not in text_columns]
    text_columns = [c for c in text_columns if c in columns]

    def check(row: dict) -> bool:
        for c in numeric:
            float(row[c])
        return all(row[c] != "" for c in text_columns)

    return check

