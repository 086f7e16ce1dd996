"""The ClickMe reader: TFRecord shards -> preprocessed batches, through ``tf.data``.

One :class:`ClickMeReader` serves evaluation and training:

- **eval** (``mode='eval'``): every record exactly once, no augmentation, the reference preprocessing
  (:mod:`advalign_jax.data.preprocess`). No image is dropped: the last batch is padded with zeros and a
  ``mask`` marks the real examples; ``index`` is each record's position in record order (files sorted
  by name, then records in file order), the ``img`` column of the evaluation CSVs.
- **train** (``mode='train'``): an endless stream; per-epoch shuffled file order, interleaved reads,
  a shuffle buffer, the training-time map variant (min-max maps, one random-resized crop and flip
  shared by image and map), and optional mixing with map-less image sources (zero map, token 0) at
  given weights. Randomness comes only from ``seed``: the same seed gives the same batches.

Multi-host, eval mode: each process reads its own files (``process_index::process_count`` of the
sorted list); with fewer files than processes it reads all files and keeps every ``process_count``-th
record of each. Every process yields the same number of batches (padding with fully masked batches),
so all hosts run the same number of steps, and each record is read by exactly one process.

Multi-host, train mode (``process_sharding``): ``'global'`` (default) builds on every process the
stream a single process would read (all files, the same seeds) in global batches and keeps this
process's contiguous block of each, so the global batches, and the training run, do not depend on the
number of processes (each process decodes only its block when nothing is mixed in, and the whole
batch otherwise); ``'files'`` gives each process its own files (the scalable choice for many hosts
and large data: a different, equally random stream for each process count).

Human maps go through one of two pipelines (``heatmap_pipeline``): ``'harmonization'`` (the
harmonization package's loader: resize to ``heatmap_blur_size``, 10x10 Gaussian blur, resize back; the
human-alignment score and harmonizer training on the JPEG shards) or ``'as_stored'`` (the map as the
record holds it, resized bilinearly only when its size differs from ``image_size``; the adversarial-
alignment study, which correlates against the raw float32 maps of ``clickme_test_1000.tfrecords`` with no
resize and no blur). Images are preprocessed the same way in both.

Each batch is a dict of NumPy arrays: ``image`` (B, S, S, 3) float32, in [0, 1] (``image_range='0_1'``)
or 0..255 (``'0_255'``, the reference's range); ``heatmap`` (B, S, S) float32; ``label`` (B,) int32;
``token`` (B,) float32 (1 = ClickMe map, 0 = no map); in eval mode ``mask`` (B,) bool and ``index`` (B,)
int64. :meth:`ClickMeReader.global_batches` turns them into global ``jax.Array``s on a mesh.

Bad input: a record that fails a check stops the reader with one line naming the file, the record
index and the problem (:class:`advalign_jax.errors.DataError`); with ``skip_bad_records`` it is
skipped and counted (:attr:`ClickMeReader.skipped`).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from advalign_jax.data import records
from advalign_jax.data.pipeline import ClickMePipeline, tfds_source
from advalign_jax.data.reader_config import EVAL, HEATMAP_PIPELINES, TRAIN, ReaderConfig
from advalign_jax.data.shards import count_records, locate_bad_record, resolve_files
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import ConfigError, DataError
from advalign_jax.parallel import shard_batch

# The reader's public names, with the options (reader_config), the file checks (shards) and the
# tf.data pipeline (pipeline) that it is built from.
__all__ = ["EVAL", "HEATMAP_PIPELINES", "TRAIN", "ClickMeReader", "ReaderConfig", "TrainBatches", "count_records",
           "locate_bad_record", "resolve_files", "tfds_source"]


class ClickMeReader:
    """Iterates ClickMe batches; see the module docstring for what a batch holds."""

    def __init__(self, config: ReaderConfig, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, extra_sources: Sequence = ()):
        """``extra_sources``: tf.data datasets of {'image', 'label'} to mix in besides
        ``config.mix_sources``, as (dataset, weight) pairs (weights included in the sum-to-1 check)."""
        self.config = config
        if process_index is None or process_count is None:
            process_index, process_count = jax.process_index(), jax.process_count()
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.process_index, self.process_count = process_index, process_count
        # A training stream of map-less sources only (clickme_weight 0, e.g. plain ImageNet from TFDS)
        # needs no ClickMe files.
        mapless_only = config.mode == TRAIN and not config.files and config.clickme_weight == 0 and bool(
            config.mix_sources or extra_sources)
        self.files = [] if mapless_only else resolve_files(config.files)
        # Train mode, 'global': every process reads the single-process stream and keeps its block.
        self.global_stream = (config.mode == TRAIN and config.process_sharding == "global" and process_count > 1)
        self.record_sharded = len(self.files) < process_count and not self.global_stream
        if self.record_sharded or self.global_stream:
            self.my_file_ids = list(range(len(self.files)))
        else:
            self.my_file_ids = list(range(process_index, len(self.files), process_count))
        self._extra_sources = list(extra_sources)
        if self._extra_sources:
            weights = [config.clickme_weight, *config.mix_weights, *(w for _, w in self._extra_sources)]
            if abs(sum(weights) - 1.0) > 1e-6:
                raise ConfigError(f"mixing weights must sum to 1, got {' + '.join(map(str, weights))}")
        self._counts = None
        self._damaged: dict[str, str] = {}
        self._pipeline = ClickMePipeline(config, self.files, self.my_file_ids, process_index, process_count,
                                         self.global_stream, self.record_sharded, self._extra_sources,
                                         lambda: self.record_counts)

    # -- sizes ----------------------------------------------------------------------------------------

    def check_not_empty(self) -> None:
        """Refuses files that hold no records at all (one line naming them), unless ``allow_empty``."""
        if self.config.allow_empty or sum(self.record_counts):
            return
        names = ", ".join(self.files[:3]) + (f" and {len(self.files) - 3} more" if len(self.files) > 3 else "")
        raise DataError(f"{names}: no records (data.files matched {len(self.files)} file(s) holding 0 "
                        "records); check the files, or set data.allow_empty=true to accept an empty run")

    @property
    def record_counts(self) -> list[int]:
        """Readable records per file (all files), counted once; checks every file's framing."""
        if self._counts is None:
            counts = []
            for path in self.files:
                n, problem = count_records(path, skip_damaged=self.config.skip_bad_records)
                if problem:
                    self._damaged[path] = problem
                counts.append(n)
            self._counts = counts
        return self._counts

    def _process_records(self, p: int) -> int:
        counts = self.record_counts
        if self.record_sharded:
            return len(range(p, sum(counts), self.process_count))
        return sum(counts[i] for i in range(p, len(self.files), self.process_count))

    @property
    def num_records(self) -> int:
        """Records this process reads in one eval pass (bad ones included)."""
        return self._process_records(self.process_index)

    @property
    def num_batches(self) -> int:
        """Batches every process yields in eval mode: ceil(max per-process records / batch_size)."""
        most = max(self._process_records(p) for p in range(self.process_count))
        return math.ceil(most / self.config.batch_size)

    @property
    def skipped(self) -> int:
        """Records skipped so far under ``skip_bad_records`` (a damaged file's unreadable tail counts 1).

        Exact once an iteration has finished; during one it also counts records still in flight.
        """
        if not self.config.skip_bad_records:
            return 0
        return int(self._pipeline.attempted.numpy() - self._pipeline.passed.numpy()) + len(self._damaged)

    def dataset(self):
        """The tf.data pipeline of (unpadded) batches, internal fields included."""
        return self._pipeline.dataset()

    # -- host iteration ------------------------------------------------------------------------------

    def _check(self, batch):
        bad = np.flatnonzero(batch["status"])
        if bad.size == 0:
            return
        k = bad[0]
        code, fid = int(batch["status"][k]), int(batch["file_id"][k])
        where = self.files[fid] if fid >= 0 else "a map-less image source"
        message = records.STATUS_MESSAGES.get(code, f"status {code}")
        if code == 6:
            message = (f"label {int(batch['label'][k])} is outside the configured class range "
                       f"[0, {self.config.num_classes}) (data.num_classes)")
        rec = f"record {int(batch['record'][k])}: " if fid >= 0 else ""
        raise DataError(f"{where}: {rec}{message}")

    def _translate(self, err) -> DataError:
        where = locate_bad_record([self.files[i] for i in self.my_file_ids], self.config.num_classes,
                                  self.config.encoding)
        first = getattr(err, "message", str(err)).splitlines()[0]
        return DataError(where or f"reading {len(self.my_file_ids)} file(s) failed: {first}")

    def _numpy_batches(self) -> Iterator[dict]:
        tf = import_tf()
        it = iter(self.dataset().as_numpy_iterator())
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except tf.errors.OpError as err:
                raise self._translate(err) from None
            if not self.config.skip_bad_records:
                self._check(batch)
            yield batch

    def train_batches(self) -> "TrainBatches":
        """The training stream as a checkpointable iterator (``save``/``restore`` its position)."""
        if self.config.mode != TRAIN:
            raise ValueError("train_batches() needs mode='train'")
        return TrainBatches(self)

    def __iter__(self) -> Iterator[dict]:
        cfg = self.config
        keep = ("image", "heatmap", "label", "token")
        if cfg.mode == TRAIN:
            yield from self.train_batches()
            return
        # One process, nothing skipped: the stream ends with the last record, no count pass needed.
        # Otherwise the count pass fixes how many batches every process yields (and finds damaged
        # files before any decoding).
        need_count = self.process_count > 1 or cfg.skip_bad_records
        total = self.num_batches if need_count else 0
        self._pipeline.attempted.assign(0)
        self._pipeline.passed.assign(0)
        produced, pending = 0, None
        for batch in self._numpy_batches():
            part = {k: batch[k] for k in keep + ("index",)}
            if pending is None and len(part["label"]) == cfg.batch_size:
                yield self._pad(part)  # the common case: a full batch, no copy
                produced += 1
                continue
            # Skipped records make batches short: regroup into full batches before padding.
            pending = part if pending is None else {k: np.concatenate([pending[k], part[k]]) for k in part}
            while len(pending["label"]) >= cfg.batch_size:
                full = {k: v[:cfg.batch_size] for k, v in pending.items()}
                pending = {k: v[cfg.batch_size:] for k, v in pending.items()}
                yield self._pad(full)
                produced += 1
            if not len(pending["label"]):
                pending = None
        if pending is not None:
            yield self._pad(pending)
            produced += 1
        while produced < total:
            yield self._pad(None)
            produced += 1

    def _pad(self, part: Optional[dict]) -> dict:
        """Pads a partial batch to batch_size with zeros; ``mask`` marks the real examples."""
        cfg = self.config
        b, s = cfg.batch_size, cfg.image_size
        n = 0 if part is None else len(part["label"])
        if n == b:
            return {**part, "mask": np.ones((b,), bool)}
        out = {
            "image": np.zeros((b, s, s, 3), np.float32), "heatmap": np.zeros((b, s, s), np.float32),
            "label": np.zeros((b,), np.int32), "token": np.zeros((b,), np.float32),
            "index": np.full((b,), -1, np.int64), "mask": np.arange(b) < n,
        }
        if n:
            for k in ("image", "heatmap", "label", "token", "index"):
                out[k][:n] = part[k]
        return out

    def take(self, num_batches: int) -> Iterator[dict]:
        """The first ``num_batches`` batches (for the endless training stream)."""
        for i, batch in enumerate(self):
            if i >= num_batches:
                return
            yield batch

    def global_batches(self, mesh, num_batches: Optional[int] = None):
        """Batches as global ``jax.Array``s sharded along the mesh's data axis."""
        it = iter(self) if num_batches is None else self.take(num_batches)
        for batch in it:
            yield shard_batch(batch, mesh)


class TrainBatches:
    """An endless training stream of NumPy batches whose position can be saved and restored exactly
    (``tf.train.Checkpoint`` of the tf.data iterator: file order, shuffle buffers, mixing state)."""

    KEEP = ("image", "heatmap", "label", "token")

    def __init__(self, reader: ClickMeReader):
        self._reader = reader
        self._it = iter(reader.dataset())

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        tf = import_tf()
        try:
            batch = {k: v.numpy() for k, v in next(self._it).items()}
        except tf.errors.OpError as err:
            raise self._reader._translate(err) from None
        if not self._reader.config.skip_bad_records:
            self._reader._check(batch)
        return {k: batch[k] for k in self.KEEP}

    def save(self, prefix: str) -> None:
        tf = import_tf()
        tf.train.Checkpoint(iterator=self._it).write(prefix)

    def restore(self, prefix: str) -> None:
        tf = import_tf()
        tf.train.Checkpoint(iterator=self._it).read(prefix).assert_consumed()
