"""The ``tf.data`` pipeline behind :class:`~advalign_jax.data.reader.ClickMeReader`: one process's
stream of (unpadded) ClickMe batches, with the fields the reader checks.

:class:`ClickMePipeline` reads this process's files (eval: one after the other in sorted order, so the
stream is in record order; train: ``cycle_length`` files interleaved in a per-epoch shuffled order,
then a shuffle buffer), decodes and checks each record (:func:`~advalign_jax.data.records.parse_example_tf`),
preprocesses image and map (:mod:`advalign_jax.data.preprocess`), augments in train mode, mixes in
map-less image sources (:func:`tfds_source`; zero map, token 0) and batches. Which records are this
process's (its own files, every ``process_count``-th record, or its block of every global batch) the
reader decides (its module docstring) and passes in.

Randomness comes only from ``config.seed``: example n of a stream gets the stateless seed
``(seed * 1_000_003 + salt * 7919 + process, n)`` (``salt`` 0 for ClickMe, k + 1 for the k-th mixed
source; ``process`` 0 in a global stream).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from advalign_jax.data import preprocess, records
from advalign_jax.data.reader_config import EVAL, TRAIN, ReaderConfig
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import ConfigError, DataError


def tfds_source(spec: str, data_dir: Optional[str], seed: int, shuffle_files: bool = True):
    """A map-less image source 'tfds:NAME[:SPLIT]' -> dataset of {'image': uint8 (H, W, 3), 'label'}.

    The dataset must already be prepared in ``data_dir`` (nothing is downloaded).
    """
    import tensorflow_datasets as tfds  # heavy import, needed only to mix in TFDS sources

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


class ClickMePipeline:
    """Builds one process's ``tf.data`` stream of ClickMe batches (:meth:`dataset`).

    ``files``: every file, sorted (a record's ``file_id`` indexes them); ``file_ids``: those this
    process reads; ``global_stream``: train mode on several processes with ``process_sharding='global'``
    (every process builds the single-process stream and keeps its block of each global batch);
    ``record_sharded``: every process reads every file and keeps every ``process_count``-th record;
    ``extra_sources``: (dataset, weight) pairs mixed in besides ``config.mix_sources``;
    ``record_counts()``: the readable records of every file (multi-process evaluation needs them for
    the record index). ``attempted`` and ``passed`` count the records tried and kept under
    ``skip_bad_records``.
    """

    def __init__(self, config: ReaderConfig, files: Sequence[str], file_ids: Sequence[int], process_index: int,
                 process_count: int, global_stream: bool, record_sharded: bool, extra_sources: Sequence,
                 record_counts: Callable[[], list]):
        self.config = config
        self.files = list(files)
        self.file_ids = list(file_ids)
        self.process_index, self.process_count = process_index, process_count
        self.global_stream, self.record_sharded = global_stream, record_sharded
        self.extra_sources = list(extra_sources)
        self.record_counts = record_counts
        tf = import_tf()
        self.attempted = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.passed = tf.Variable(0, dtype=tf.int64, trainable=False)

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
            counts = np.asarray(self.record_counts(), np.int64)
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
            self.attempted.assign_add(1)
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
        passed = self.passed

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
            ds = self._eval_index(self._read_files(self.file_ids, shuffle_files=False))
            zero_seed = tf.zeros([2], tf.int64)

            def example(f, i, raw, index):
                return {**self._clickme_example(f, i, raw, zero_seed), "index": index}

            ds = ds.map(example, num_parallel_calls=AUTO, deterministic=True)
        elif not self.files:
            ds = None
        else:
            ds = self._read_files(self.file_ids, shuffle_files=True)
            ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed + 1)
            ds = self._seeded(ds, salt=0)
            mixing = bool(cfg.mix_sources or self.extra_sources)
            if self.global_stream and not mixing:
                # Keep this process's block of every global batch before decoding: position n of the
                # global stream is row n % (B * P) of global batch n // (B * P).
                b, pi = cfg.batch_size, self.process_index
                gb = b * self.process_count
                ds = ds.enumerate().filter(lambda n, x: tf.logical_and(n % gb >= pi * b, n % gb < (pi + 1) * b))
                ds = ds.map(lambda n, x: x)
            ds = ds.map(lambda rec, s: self._clickme_example(*rec, s), num_parallel_calls=AUTO,
                        deterministic=True)
        if cfg.skip_bad_records and ds is not None:
            ds = ds.ignore_errors()  # records whose bytes TF cannot decode; counted via attempted
            ds = self._skip_filter(ds)
        if cfg.mode == TRAIN:
            sources = [tfds_source(s, cfg.tfds_data_dir, cfg.seed + 2 + k)
                       for k, s in enumerate(cfg.mix_sources)]
            sources += [src for src, _ in self.extra_sources]
            weights = [cfg.clickme_weight, *cfg.mix_weights, *(w for _, w in self.extra_sources)]
            if not self.files:  # map-less sources only (the reader allows it with clickme_weight 0)
                weights = weights[1:]
            if sources:
                mixed = [ds] if self.files else []
                for k, src in enumerate(sources):
                    src = src.repeat().shuffle(min(cfg.shuffle_buffer, 1024), seed=cfg.seed + 100 + k)
                    src = self._seeded(src, salt=k + 1)
                    src = src.map(self._mapless_example, num_parallel_calls=AUTO, deterministic=True)
                    if cfg.skip_bad_records:
                        src = src.filter(lambda ex: tf.equal(ex["status"], 0))
                    mixed.append(src)
                ds = tf.data.Dataset.sample_from_datasets(mixed, weights=weights, seed=cfg.seed + 3)
        if self.global_stream and (cfg.mix_sources or self.extra_sources):
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
