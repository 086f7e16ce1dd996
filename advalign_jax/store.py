"""The crash-safe results store every long job writes through.

What a crash (``kill -9``, a full disk, a power cut of the process) can leave, and what is kept:

- **One owner per workdir** (:class:`WorkdirLock`): an exclusive ``flock`` on ``WORKDIR/.lock``, held
  for the run and released by the operating system when the process ends, however it ends. A second
  run on the same workdir stops with one line naming the holder's PID.
- **Whole rows** (:class:`RowFile`): result rows are appended as whole lines in one write, flushed and
  synced, batch by batch. A line without its newline (a write cut short), a row with the wrong number
  of fields or a value that does not parse is dropped when the file is reopened (the file is cut back
  to its last whole line) and recomputed by the resumed run. A row is never written twice.
- **Whole files** (:func:`atomic_write`): summaries, JSON records and figures are written to a
  temporary file of this process, synced, and renamed over the old one: a reader sees the old file or
  the new, never half of one.
- **What made the results** (:class:`RunRecord`): ``config.json`` records the values of the keys that
  decide the results; it is written with the first result, so a run that failed before producing any
  (a pattern that matched nothing) does not hold its workdir. A rerun whose keys differ is refused
  with a line naming them. ``models.json`` records each result name's checkpoint path and
  :func:`fingerprint` (architecture, options, a hash of every variable): results of another checkpoint
  under the same name are refused with a line naming both paths.
- **Output problems** (an output path that is a file, a read-only or full disk) become one line
  (:class:`OutputError`) that names the path and what to do; what was written before is kept.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import socket
import sys
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from advalign_jax import faults
from advalign_jax.errors import AdvalignError


class OutputError(AdvalignError):
    """A result could not be written (not a directory, read-only, disk full)."""


class WorkdirBusy(AdvalignError):
    """Another process holds the workdir."""


_ADVICE = {
    errno.ENOSPC: "the disk is full; free space and rerun the same command to complete the missing results",
    errno.EDQUOT: "the disk quota is exceeded; free space and rerun the same command",
    errno.EROFS: "the file system is read-only; use another --config.workdir / --out",
    errno.EACCES: "permission denied; use another --config.workdir / --out",
    errno.EPERM: "permission denied; use another --config.workdir / --out",
    errno.ENOTDIR: "a file stands where a directory is needed; use another --config.workdir / --out",
    errno.EEXIST: "a file stands where a directory is needed; use another --config.workdir / --out",
    errno.EISDIR: "a directory stands where a file is needed; use another path",
}


def os_error_in(err: BaseException) -> "OSError | None":
    """The operating-system error behind an exception: an OSError in its cause chain, or the errno that
    libraries which re-raise file errors as other types name in their message (orbax/TensorStore write
    ``[os_error_code='28']``; TensorFlow names the error's text)."""
    import re  # pylint: disable=import-outside-toplevel

    seen = 0
    cur = err
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and cur.errno:
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    text = str(err)
    match = re.search(r"os_error_code='(\d+)'", text)
    if match:
        return OSError(int(match.group(1)), os.strerror(int(match.group(1))))
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return None


def output_error(path: str, err: OSError) -> OutputError:
    """One line for an OSError met while writing ``path``."""
    advice = _ADVICE.get(err.errno, "check the path and rerun")
    reason = os.strerror(err.errno) if err.errno else str(err)
    return OutputError(f"cannot write {path}: {reason}; {advice}")


@contextlib.contextmanager
def writing(path: str):
    """Turns an OSError raised inside the block into an :class:`OutputError` naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        raise output_error(getattr(err, "filename", None) or path, err) from None
    except Exception as err:  # TensorFlow's file errors (tf.errors.OpError) carry their own message
        if type(err).__module__.startswith("tensorflow") and hasattr(err, "message"):
            raise OutputError(f"cannot write {path}: {str(err.message).splitlines()[0]}; check free space and "
                              "the path, then rerun") from None
        raise


@contextlib.contextmanager
def quiet_library_errors(on_failure: Optional[Callable[[], None]] = None):
    """Silences what libraries' worker threads log or print while a write fails (orbax logs each failed
    thread through absl and asyncio, and TensorStore's callbacks print to the process's stderr): the
    caller reports the failure in one line. ``on_failure`` runs (silenced too) before the error goes
    on, e.g. to join those threads. Everything is restored when the block ends."""
    import logging  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel

    loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "concurrent.futures")]
    levels = [lg.level for lg in loggers]
    hook = threading.excepthook
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    threading.excepthook = lambda args: None
    saved_fd = None
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    except (OSError, ValueError, AttributeError):  # no real stderr descriptor: logging is silenced anyway
        saved_fd = None
    try:
        yield
    except BaseException:
        if on_failure is not None:
            with contextlib.suppress(Exception):
                on_failure()
        raise
    finally:
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        threading.excepthook = hook


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
        import fcntl  # pylint: disable=import-outside-toplevel

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
                    data = text.encode()
                    if faults.reached("rows.torn"):  # a write cut short, for the crash tests
                        f.write(data[:len(data) // 2 + 1])
                        f.flush()
                        faults.die()
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    with contextlib.suppress(OSError):
                        f.truncate(start)
                    raise
        except OSError as err:
            raise output_error(self.path, err) from None
        for f in formatted:
            self.rows[f[self.key]] = f
        faults.crash_point("rows.appended")


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


# ----------------------------------------------------------------------------------------------------
# What made the results
# ----------------------------------------------------------------------------------------------------


def _plain(value):
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def first_difference(a, b, key: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else k)
    return f"{key}: {a!r} there, {b!r} now"


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Every leaf key (dotted) whose value differs between two nested dicts."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


class RunRecord:
    """``WORKDIR/config.json`` (the result-deciding config values) and ``WORKDIR/models.json`` (the
    checkpoint behind each result name)."""

    def __init__(self, workdir: str, config, keys: Sequence[str]):
        self.workdir = workdir
        self.path = os.path.join(workdir, "config.json")
        self.models_path = os.path.join(workdir, "models.json")
        self.current = {k: _plain(config[k]) for k in keys}
        self.keys = tuple(keys)
        self._written = False

    def check(self, has_results: bool) -> None:
        """Refuses a workdir whose results were made with other values of the keys. A record without
        results (a run that failed before its first result) is replaced."""
        saved = read_json(self.path)
        if saved is None or not has_results:
            return
        for key in self.keys:
            if saved.get(key) != self.current[key]:
                raise AdvalignError(f"{self.workdir} holds results of a different configuration "
                                    f"({first_difference(saved.get(key), self.current[key], key)}); "
                                    "use another --config.workdir or remove that folder")
        self._written = True

    def commit(self) -> None:
        """Writes config.json (once, with the first result)."""
        if not self._written:
            atomic_write_json(self.path, self.current)
            self._written = True

    def check_models(self, entries: dict, has_results: Callable[[str], bool],
                     advice: str = "give it another directory name or use another --config.workdir") -> None:
        """``entries``: {result name: {'path': ..., 'fingerprint': ...}}. A name whose stored results
        came from another checkpoint is refused (the line ends with ``advice``)."""
        saved = read_json(self.models_path, {})
        for name, entry in entries.items():
            old = saved.get(name)
            if old and old.get("fingerprint") != entry["fingerprint"] and has_results(name):
                raise AdvalignError(
                    f"{self.workdir} holds results named {name!r} of the checkpoint {old.get('path')} "
                    f"(fingerprint {old.get('fingerprint', '?')[:12]}), but {entry['path']} (fingerprint "
                    f"{entry['fingerprint'][:12]}) is another model; {advice}")

    def commit_model(self, name: str, entry: dict) -> None:
        saved = read_json(self.models_path, {})
        if saved.get(name) != entry:
            saved[name] = entry
            atomic_write_json(self.models_path, saved)


def fingerprint(arch: str, options: dict, variables) -> str:
    """sha256 of the architecture, its options and every variable (path, dtype, shape, bytes): two
    checkpoints share a fingerprint only if they compute the same function."""
    import jax  # pylint: disable=import-outside-toplevel

    h = hashlib.sha256()
    h.update(json.dumps({"arch": arch, "options": _plain(options)}, sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
