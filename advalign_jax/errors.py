"""User-facing errors: each carries one line that names what was wrong and where, and what to do.

The command line prints ``advalign-jax: error: <line>`` for these and exits with status 2; any other
exception is a bug and keeps its traceback.

Output problems (a file where a directory should be, a read-only or full disk) become one
:class:`OutputError` line naming the path and the advice for that errno (:func:`output_error`,
:func:`writing`); libraries that wrap file errors in their own types (orbax/TensorStore, TensorFlow)
are looked through for the operating-system error behind them (:func:`os_error_in`), and their worker
threads' logging is silenced while such a write fails (:func:`quiet_library_errors`), so the one line is
all a user reads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
from typing import Callable, Optional


class AdvalignError(Exception):
    """Bad input from the user (a file, a record, a config key, a flag): one clear line."""


class DataError(AdvalignError):
    """A data file or record that cannot be read as the configured format."""


class ConfigError(AdvalignError):
    """A config file, key or value that is not valid."""


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
