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

import dataclasses
import math
from typing import Iterator, Optional, Sequence

import numpy as np

from advalign_jax.data import preprocess, records
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import ConfigError, DataError

EVAL, TRAIN = "eval", "train"
HEATMAP_PIPELINES = ("harmonization", "as_stored")


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
    """Options of :class:`ClickMeReader`; the ``data`` block of every config mirrors these fields."""

    files: Sequence[str]
    batch_size: int  # per process
    mode: str = EVAL
    num_classes: int = 1000
    encoding: str = "auto"  # 'auto' | 'jpeg' | 'raw_float32'
    image_size: int = preprocess.IMAGE_SIZE
    heatmap_blur_size: int = preprocess.HEATMAP_BLUR_SIZE
    heatmap_small_method: str = "bilinear"  # 'bicubic' in the lab's older training code
    heatmap_pipeline: str = "harmonization"  # 'harmonization' (resize, blur, resize) or 'as_stored'
    image_range: str = "0_1"  # '0_1' or '0_255'
    minmax_maps: Optional[bool] = None  # None: True in train mode, False in eval mode
    random_crop: bool = True  # train mode only
    crop_area_range: tuple = (0.08, 1.0)
    crop_aspect_range: tuple = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True  # train mode only
    seed: int = 0
    shuffle_buffer: int = 2048
    cycle_length: int = 8
    skip_bad_records: bool = False
    allow_empty: bool = False  # accept files that hold no records (else: one line naming them)
    process_sharding: str = "global"  # train mode, several processes: 'global' or 'files' (module docstring)
    clickme_weight: float = 1.0
    mix_sources: Sequence[str] = ()  # e.g. ('tfds:imagenet2012:train',)
    mix_weights: Sequence[float] = ()
    tfds_data_dir: Optional[str] = None

    def __post_init__(self):
        if self.mode not in (EVAL, TRAIN):
            raise ConfigError(f"data.mode must be 'eval' or 'train', got {self.mode!r}")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.encoding not in ("auto",) + records.ENCODINGS:
            raise ConfigError(f"data.encoding must be one of auto, jpeg, raw_float32; got {self.encoding!r}")
        if self.process_sharding not in ("global", "files"):
            raise ConfigError(f"data.process_sharding must be 'global' or 'files', got {self.process_sharding!r}")
        if self.heatmap_pipeline not in HEATMAP_PIPELINES:
            raise ConfigError(f"data.heatmap_pipeline must be one of {', '.join(HEATMAP_PIPELINES)}; got "
                              f"{self.heatmap_pipeline!r}")
        if self.image_range not in ("0_1", "0_255"):
            raise ConfigError(f"data.image_range must be '0_1' or '0_255', got {self.image_range!r}")
        if len(self.mix_sources) != len(self.mix_weights):
            raise ConfigError(f"data.mix_sources has {len(self.mix_sources)} entries but data.mix_weights "
                              f"has {len(self.mix_weights)}")
        if self.mix_sources:
            if self.mode != TRAIN:
                raise ConfigError("data.mix_sources mixes map-less images into training; it needs "
                                  "data.mode='train'")
            weights = [self.clickme_weight, *self.mix_weights]
            if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
                terms = " + ".join(f"{w:g}" for w in weights)
                raise ConfigError(f"mixing weights data.clickme_weight + data.mix_weights must be "
                                  f"non-negative and sum to 1, got {terms} = {sum(weights):g}")

    @property
    def use_minmax(self) -> bool:
        return self.mode == TRAIN if self.minmax_maps is None else bool(self.minmax_maps)


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


def tfds_source(spec: str, data_dir: Optional[str], seed: int, shuffle_files: bool = True):
    """A map-less image source 'tfds:NAME[:SPLIT]' -> dataset of {'image': uint8 (H, W, 3), 'label'}.

    The dataset must already be prepared in ``data_dir`` (nothing is downloaded).
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "tfds" or not parts[1]:
        raise ConfigError(f"data.mix_sources entry {spec!r} must look like 'tfds:NAME' or 'tfds:NAME:SPLIT'")
    name, split = parts[1], (parts[2] if len(parts) == 3 else "train")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as err:  # DatasetNotFoundError and friends differ across tfds versions
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"data.mix_sources: cannot open TFDS dataset {name!r}: {first}") from None
    read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=4)
    try:
        ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
    except AssertionError:  # what tfds raises when the data is not in data_dir
        raise DataError(f"TFDS dataset {name!r} is not prepared in data_dir={builder.data_dir!r}: "
                        f"run `tfds build {name} --data_dir=DIR` on a machine with internet (or copy "
                        f"a prepared copy there) and set data.tfds_data_dir=DIR") from None
    except ValueError as err:  # unknown split
        raise ConfigError(f"data.mix_sources: {spec!r}: {str(err).splitlines()[0]}") from None
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})


class ClickMeReader:
    """Iterates ClickMe batches; see the module docstring for what a batch holds."""

    def __init__(self, config: ReaderConfig, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, extra_sources: Sequence = ()):
        """``extra_sources``: tf.data datasets of {'image', 'label'} to mix in besides
        ``config.mix_sources``, as (dataset, weight) pairs (weights included in the sum-to-1 check)."""
        self.config = config
        if process_index is None or process_count is None:
            import jax  # pylint: disable=import-outside-toplevel
            process_index, process_count = jax.process_index(), jax.process_count()
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.process_index, self.process_count = process_index, process_count
        self.files = resolve_files(config.files)
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
        tf = import_tf()
        self._attempted = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._passed = tf.Variable(0, dtype=tf.int64, trainable=False)

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
        return int(self._attempted.numpy() - self._passed.numpy()) + len(self._damaged)

    # -- tf.data pipeline ----------------------------------------------------------------------------

    def _read_files(self, file_ids, shuffle_files: bool):
        """Dataset of (file_id, record_index_in_file, serialized) for this process.

        Training interleaves ``cycle_length`` files in a per-epoch shuffled order; evaluation reads
        files one after the other in sorted order, so the stream is in record order.
        """
        tf = import_tf()
        cfg = self.config
        paths = tf.constant(self.files)
        skip = cfg.skip_bad_records
        pc, pi, sharded = self.process_count, self.process_index, self.record_sharded

        def read(fid):
            ds = tf.data.TFRecordDataset(tf.gather(paths, fid))
            if skip:
                ds = ds.ignore_errors()
            return ds.enumerate().map(lambda i, raw: (tf.cast(fid, tf.int32), i, raw))

        ds = tf.data.Dataset.from_tensor_slices(np.asarray(file_ids, np.int32))
        if shuffle_files:
            ds = ds.shuffle(len(file_ids), seed=cfg.seed, reshuffle_each_iteration=True).repeat()
            cycle = max(1, min(cfg.cycle_length, len(file_ids)))
            ds = ds.interleave(read, cycle_length=cycle, block_length=1,
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            if sharded:
                ds = ds.filter(lambda f, i, raw: tf.equal(i % pc, pi))
            return ds
        return ds.flat_map(read)

    def _eval_index(self, ds):
        """Adds ``index`` (position in record order) and keeps this process's records.

        Files are read in sorted order, so a record's index is its position in the stream of all
        (readable) records of the files this process reads, shifted by the records of the files of
        lower index that other processes read (known from the count pass, needed only then).
        """
        tf = import_tf()
        pc, pi = self.process_count, self.process_index
        if pc > 1 and not self.record_sharded:
            counts = np.asarray(self.record_counts, np.int64)
            offsets = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]))
            return ds.map(lambda f, i, raw: (f, i, raw, tf.gather(offsets, f) + i))
        ds = ds.enumerate().map(lambda n, rec: (*rec, n))
        if pc > 1:  # record sharding: every process reads every file, keeps every pc-th record
            ds = ds.filter(lambda f, i, raw, n: tf.equal(n % pc, pi))
        return ds

    def _finish_map(self, image, heatmap):
        if self.config.use_minmax:
            heatmap = preprocess.minmax_normalise(heatmap)
        if self.config.image_range == "0_1":
            image = image / 255.0
        return image, heatmap[..., 0]

    def _clickme_example(self, fid, rec, raw, example_seed):
        tf = import_tf()
        cfg = self.config
        if cfg.skip_bad_records:
            self._attempted.assign_add(1)
        ex = records.parse_example_tf(raw, cfg.num_classes, cfg.encoding)
        image = preprocess.preprocess_image(ex["image"], cfg.image_size)
        if cfg.heatmap_pipeline == "as_stored":
            heatmap = preprocess.heatmap_as_stored(ex["heatmap"], cfg.image_size)
        else:
            heatmap = preprocess.preprocess_heatmap(ex["heatmap"], cfg.image_size, cfg.heatmap_blur_size,
                                                    small_method=cfg.heatmap_small_method)
        if cfg.mode == TRAIN and (cfg.random_crop or cfg.flip):
            image, heatmap = self._augment(image, heatmap, example_seed)
        image, heatmap = self._finish_map(image, heatmap)
        return {"image": image, "heatmap": heatmap, "label": ex["label"],
                "token": tf.constant(1.0, tf.float32), "status": ex["status"],
                "file_id": fid, "record": rec}

    def _augment(self, image, heatmap, example_seed):
        tf = import_tf()
        cfg = self.config
        if cfg.random_crop:
            area, aspect = tuple(cfg.crop_area_range), tuple(cfg.crop_aspect_range)
        else:
            area, aspect = (1.0, 1.0), (1.0, 1.0)
        image, heatmap = preprocess.random_resized_crop_flip(
            image, heatmap, example_seed, size=cfg.image_size, area_range=area, aspect_range=aspect,
            flip=cfg.flip)
        return tf.ensure_shape(image, [cfg.image_size, cfg.image_size, 3]), heatmap

    def _mapless_example(self, ex, example_seed):
        """A map-less source image: zero map, token 0, same geometry as the ClickMe images."""
        tf = import_tf()
        cfg = self.config
        image = preprocess.preprocess_image(ex["image"], cfg.image_size)
        heatmap = tf.zeros([cfg.image_size, cfg.image_size, 1], tf.float32)
        if cfg.random_crop or cfg.flip:
            image, heatmap = self._augment(image, heatmap, example_seed)
        image, heatmap = self._finish_map(image, heatmap)
        label = tf.cast(ex["label"], tf.int32)
        status = tf.where(tf.logical_and(label >= 0, label < cfg.num_classes), 0, 6)
        return {"image": image, "heatmap": heatmap, "label": label,
                "token": tf.constant(0.0, tf.float32), "status": tf.cast(status, tf.int32),
                "file_id": tf.constant(-1, tf.int32), "record": tf.constant(-1, tf.int64)}

    def _seeded(self, ds, salt: int):
        """Attaches a per-example stateless seed: (seed, salt, process, position in the stream); the
        process does not enter a global stream, which is the same on every process."""
        tf = import_tf()
        process = 0 if self.global_stream else self.process_index
        base = np.int64(self.config.seed) * 1_000_003 + salt * 7919 + process
        return ds.enumerate().map(lambda i, x: (x, tf.stack([tf.constant(base, tf.int64), i])))

    def _skip_filter(self, ds):
        tf = import_tf()
        passed = self._passed

        def keep(ex):
            ok = tf.equal(ex["status"], 0)
            passed.assign_add(tf.cast(ok, tf.int64))
            return ok

        return ds.filter(keep)

    def dataset(self):
        """The tf.data pipeline of (unpadded) batches, internal fields included."""
        tf = import_tf()
        cfg = self.config
        AUTO = tf.data.AUTOTUNE
        if cfg.mode == EVAL:
            ds = self._eval_index(self._read_files(self.my_file_ids, shuffle_files=False))
            zero_seed = tf.zeros([2], tf.int64)

            def example(f, i, raw, index):
                return {**self._clickme_example(f, i, raw, zero_seed), "index": index}

            ds = ds.map(example, num_parallel_calls=AUTO, deterministic=True)
        else:
            ds = self._read_files(self.my_file_ids, shuffle_files=True)
            ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed + 1)
            ds = self._seeded(ds, salt=0)
            mixing = bool(cfg.mix_sources or self._extra_sources)
            if self.global_stream and not mixing:
                # Keep this process's block of every global batch before decoding: position n of the
                # global stream is row n % (B * P) of global batch n // (B * P).
                b, pi = cfg.batch_size, self.process_index
                gb = b * self.process_count
                ds = ds.enumerate().filter(lambda n, x: tf.logical_and(n % gb >= pi * b, n % gb < (pi + 1) * b))
                ds = ds.map(lambda n, x: x)
            ds = ds.map(lambda rec, s: self._clickme_example(*rec, s), num_parallel_calls=AUTO,
                        deterministic=True)
        if cfg.skip_bad_records:
            ds = ds.ignore_errors()  # records whose bytes TF cannot decode; counted via _attempted
            ds = self._skip_filter(ds)
        if cfg.mode == TRAIN:
            sources = [tfds_source(s, cfg.tfds_data_dir, cfg.seed + 2 + k)
                       for k, s in enumerate(cfg.mix_sources)]
            sources += [src for src, _ in self._extra_sources]
            weights = [cfg.clickme_weight, *cfg.mix_weights, *(w for _, w in self._extra_sources)]
            if sources:
                mixed = [ds]
                for k, src in enumerate(sources):
                    src = src.repeat().shuffle(min(cfg.shuffle_buffer, 1024), seed=cfg.seed + 100 + k)
                    src = self._seeded(src, salt=k + 1)
                    src = src.map(self._mapless_example, num_parallel_calls=AUTO, deterministic=True)
                    if cfg.skip_bad_records:
                        src = src.filter(lambda ex: tf.equal(ex["status"], 0))
                    mixed.append(src)
                ds = tf.data.Dataset.sample_from_datasets(mixed, weights=weights, seed=cfg.seed + 3)
        if self.global_stream and (cfg.mix_sources or self._extra_sources):
            # Mixed streams: the whole global batch is built (and decoded) on every process.
            b, pi = cfg.batch_size, self.process_index
            ds = ds.batch(b * self.process_count, drop_remainder=True)
            ds = ds.map(lambda batch: {k: v[pi * b:(pi + 1) * b] for k, v in batch.items()})
        else:
            ds = ds.batch(cfg.batch_size, drop_remainder=cfg.mode == TRAIN)
        options = tf.data.Options()
        options.deterministic = True
        options.experimental_warm_start = False
        return ds.with_options(options).prefetch(AUTO)

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
        self._attempted.assign(0)
        self._passed.assign(0)
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
        from advalign_jax.parallel import shard_batch  # pylint: disable=import-outside-toplevel

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
