"""``advalign-jax``: the command line. ``advalign-jax --help`` lists the subcommands.

Each subcommand module defines ``add_parser(subparsers)``; the parser it adds sets ``func`` to the
function that runs it. User errors (:class:`advalign_jax.errors.AdvalignError`) print one line and exit
with status 2; an interruption exits with status 130 after the job has saved what it had.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from typing import Optional, Sequence

import jax

from advalign_jax import __version__, faults, parallel
from advalign_jax.cli import (construct_cmd, convert_cmd, data_cmd, evaluate_cmd, robust_cmd, sensitivity_cmd,
                              synthesize_cmd, targets_cmd, train_cmd)
from advalign_jax.config import split_overrides
from advalign_jax.errors import AdvalignError

try:  # JAX's own reader of its cache entries; another JAX layout has none (then a program's entries all go)
    from jax._src.compilation_cache import decompress_executable
except ImportError:  # pragma: no cover
    decompress_executable = None

# Subcommand modules, in the order --help lists them.
COMMANDS = (evaluate_cmd, robust_cmd, sensitivity_cmd, synthesize_cmd, construct_cmd, train_cmd, targets_cmd, data_cmd,
            convert_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="advalign-jax",
        description="Adversarial robustness and human alignment of vision models, in JAX.",
        epilog="Config-driven commands take --config FILE.py[:ARG] and overrides --config.KEY=VALUE.")
    parser.add_argument("--version", action="version", version=f"advalign-jax {__version__}")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not reuse compiled programs across runs (JAX's persistent compilation cache in "
                             "$ADVALIGN_JAX_CACHE_DIR, default ~/.cache/advalign_jax/xla)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def compile_cache_dir() -> str:
    return os.environ.get("ADVALIGN_JAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "advalign_jax", "xla")


def enable_compile_cache() -> None:
    """Reuses compiled XLA programs across runs: JAX's persistent compilation cache in
    :func:`compile_cache_dir` (every program, however quick to compile; keyed by JAX on the program,
    the compiler options and the device). An unusable directory only turns the cache off."""
    path = compile_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _repair_unreadable_cache_entries(path)


_UNREADABLE_ENTRY = "Error reading persistent compilation cache entry for '"
_cache_path: Optional[str] = None


def _repair_unreadable_cache_entries(path: str) -> None:
    """JAX writes a cache entry in place, so a run killed during that write leaves a truncated file; JAX
    then warns and recompiles on every later run but never replaces the entry. This hook turns that
    warning into one line and removes the unreadable entries of the named program, so that the same run
    writes them again whole. Other warnings pass through unchanged."""
    global _cache_path  # pylint: disable=global-statement
    first = _cache_path is None
    _cache_path = path
    if not first:  # installed once per process; the hook reads the directory in use
        return
    previous = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if not text.startswith(_UNREADABLE_ENTRY):
            previous(message, category, filename, lineno, file, line)
            return
        path = _cache_path
        program = text[len(_UNREADABLE_ENTRY):].split("'", 1)[0]
        removed = remove_unreadable_cache_entries(path, program)
        print(f"advalign-jax: warning: the compilation cache in {path} held {removed or 'an'} unreadable "
              f"entr{'y' if removed <= 1 else 'ies'} for '{program}' (a run killed while writing it?): "
              f"{'removed; ' if removed else ''}compiled again", file=sys.stderr)

    warnings.showwarning = showwarning


def remove_unreadable_cache_entries(path: str, program: str) -> int:
    """Removes the entries of ``program`` in the cache directory ``path`` that do not decompress (JAX's
    own ``decompress_executable``; where this JAX lacks it, every entry of that program), returns how
    many. Entries are named ``{program}-{64 hex digits}-cache``."""
    pattern = re.compile(re.escape(program) + r"-[0-9a-f]{64}-cache")
    removed = 0
    try:
        names = [n for n in os.listdir(path) if pattern.fullmatch(n)]
    except OSError:
        return 0
    for name in names:
        entry = os.path.join(path, name)
        try:
            if decompress_executable is not None:
                with open(entry, "rb") as f:
                    decompress_executable(f.read())
                continue
        except Exception:  # pylint: disable=broad-except  # unreadable: remove it below
            pass
        try:
            os.remove(entry)
            removed += 1
        except OSError:
            pass
    return removed


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``advalign-jax`` command. Run as the process's command (``argv`` None), a failure's one line
    is the last thing it writes to stderr (:func:`_quiet_after_error`)."""
    rc = _main(argv)
    if argv is None and rc not in (0, 130):
        _quiet_after_error()
    return rc


def _quiet_after_error() -> None:
    """Sends the rest of the process's stderr to /dev/null: after a failed write, libraries' worker
    threads (orbax's asyncio loop, TensorStore) may print tracebacks while the interpreter shuts down,
    under the line that already said what failed and what to do."""
    try:
        sys.stderr.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def _main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        rest, overrides = split_overrides(argv)
        args = parser.parse_args(rest)
        if not hasattr(args, "func"):
            parser.print_help()
            return 2
        args.config_overrides = overrides
        faults.install()  # the crash points ADVALIGN_JAX_CRASH_AT names (crash tests); nothing when unset
        if not args.no_compile_cache and os.environ.get("ADVALIGN_JAX_NO_COMPILE_CACHE", "") in ("", "0"):
            enable_compile_cache()
        if overrides and not hasattr(args, "config"):
            raise AdvalignError(f"this command takes no config; unexpected --config.{overrides[0]}")
        return int(args.func(args) or 0)
    except AdvalignError as err:
        print(f"advalign-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advalign-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # pylint: disable=broad-except
        if not parallel.is_distributed():
            raise
        # In a multi-process run another process's failure surfaces here as a failed collective.
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(f"advalign-jax: error: process {jax.process_index()} of {jax.process_count()} stopped: "
              f"{type(err).__name__}: {first} (if another process failed, its own line says why; rerun the same "
              "command to resume)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
