"""Finding ClickMe shards and checking their framing, before anything is decoded.

- :func:`resolve_files`: glob patterns (local or any ``tf.io.gfile`` scheme) -> the sorted,
  de-duplicated files they match;
- :func:`count_records`: the readable records of one file (every byte read, every checksum checked);
- :func:`locate_bad_record`: the first record of some files that fails a check, scanned in Python (to
  name the record behind an error that ``tf.data`` reports without one).

Every problem is one line naming the file and, where there is one, the record
(:class:`advalign_jax.errors.DataError`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from advalign_jax.data import records
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import DataError


def resolve_files(patterns: Sequence[str] | str, key: str = "data.files") -> list[str]:
    """Sorted, de-duplicated files matching the glob patterns (local or any ``tf.io.gfile`` scheme).

    Raises DataError naming the first pattern that matches nothing.
    """
    tf = import_tf()
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise DataError(f"{key} is empty: give at least one TFRecord file or glob pattern")
    found = set()
    for pattern in patterns:
        matches = [m for m in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(m)]
        if not matches:
            raise DataError(f"no file matches {pattern!r} ({key})")
        found.update(matches)
    return sorted(found)


def _io_problem(err) -> str:
    text = getattr(err, "message", str(err))
    if "truncated record" in text:
        return "truncated TFRecord (the file ends inside this record)"
    if "Is this even a TFRecord" in text:
        return "not a TFRecord file"
    if "corrupted record" in text:
        return "corrupt TFRecord (length or checksum mismatch)"
    return text.splitlines()[0] if text else type(err).__name__


def count_records(path: str, skip_damaged: bool = False) -> tuple[int, Optional[str]]:
    """(number of readable records, problem or None). Reads every byte and checks every checksum.

    A damaged file raises DataError naming the record, unless ``skip_damaged``: then the records
    before the damage are counted and the problem is returned.
    """
    tf = import_tf()
    try:
        return int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda c, _: c + 1)), None
    except tf.errors.NotFoundError:
        raise DataError(f"{path}: file not found") from None
    except tf.errors.OpError:
        pass
    n = 0
    try:
        for _ in tf.data.TFRecordDataset(path):
            n += 1
    except tf.errors.OpError as err:
        problem = f"record {n}: {_io_problem(err)}"
        if not skip_damaged:
            raise DataError(f"{path}: {problem}") from None
        return n, problem
    return n, None


def locate_bad_record(paths: Sequence[str], num_classes: int, encoding: str) -> Optional[str]:
    """Scans files in Python and returns '<file>: record <i>: <problem>' for the first bad record."""
    tf = import_tf()
    for path in paths:
        i = 0
        try:
            for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
                problem = records.describe_record(raw, num_classes, encoding).problem
                if problem:
                    return f"{path}: record {i}: {problem}"
                i += 1
        except tf.errors.OpError as err:
            return f"{path}: record {i}: {_io_problem(err)}"
    return None
