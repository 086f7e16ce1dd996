"""Writing ClickMe shards in either real encoding, atomically.

Files are named like the public harmonization shards, ``{prefix}-{i}.tfrecords``. Each shard is written
to a temporary name and renamed only when every shard is complete, so an error or an interruption
leaves no half-written shard behind.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import DataError, OutputError, output_error


def shard_paths(out_dir: str, prefix: str, num_shards: int) -> list[str]:
    return [os.path.join(out_dir, f"{prefix}-{i}.tfrecords") for i in range(num_shards)]


def write_shards(out_dir: str, prefix: str, num_shards: int, num_records: int,
                 example_fn: Callable[[int], bytes], overwrite: bool = False,
                 progress: Callable[[Iterable], Iterable] = lambda it: it) -> list[str]:
    """Writes records ``example_fn(0..num_records-1)`` round-robin into ``num_shards`` shards.

    Record i goes to shard ``i % num_shards``. Returns the shard paths. Existing shards are an error
    unless ``overwrite``.
    """
    tf = import_tf()
    if num_shards < 1 or num_records < 1:
        raise DataError(f"need at least one shard and one record, got {num_shards} shards, "
                        f"{num_records} records")
    num_shards = min(num_shards, num_records)
    paths = shard_paths(out_dir, prefix, num_shards)
    existing = [p for p in paths if tf.io.gfile.exists(p)]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} already exists (pass --overwrite to replace it)")
    tmp = [f"{p}.tmp-{os.getpid()}" for p in paths]
    writers = []
    try:
        tf.io.gfile.makedirs(out_dir)
        writers = [tf.io.TFRecordWriter(t) for t in tmp]
        for i in progress(range(num_records)):
            writers[i % num_shards].write(example_fn(i))
        for w in writers:
            w.close()
        for t, p in zip(tmp, paths):
            tf.io.gfile.rename(t, p, overwrite=True)
    except BaseException as err:
        for w in writers:
            try:
                w.close()
            except tf.errors.OpError:
                pass
        for t in tmp:
            try:
                if tf.io.gfile.exists(t):
                    tf.io.gfile.remove(t)
            except tf.errors.OpError:
                pass
        if isinstance(err, tf.errors.OpError):  # full disk, read-only or not a directory
            raise OutputError(f"cannot write shards into {out_dir}: {str(err.message).splitlines()[0]}; no shard "
                              "was written (check free space and the path, then rerun)") from None
        if isinstance(err, OSError):
            raise output_error(out_dir, err) from None
        raise
    return paths

