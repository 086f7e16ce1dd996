"""Training streams over in-memory arrays (``data_kind='arrays'``): TFDS datasets, digits, the toy 2-D
data, synthetic images (:func:`advalign_jax.data.images.load_arrays`).

The stream shuffles the training split with a fresh permutation per epoch drawn from ``(seed, epoch)``
and yields batches of ``image`` (un-augmented: objectives that augment do it inside the loss, so the
input-gradient stays in the frame of the stored image), ``label`` and ``index`` (the example's
position in the split, for nearest-neighbour self-exclusion and precomputed targets). With
precomputed target gradients (``objective.target_source='precomputed'``) each batch also carries
``targets`` (N, C, *image_shape), gathered from the loaded file, and the images are either the
training split's, checked against the file's image by image, or the file's own
(:func:`precomputed_training_set`).

Each process reads its contiguous block of every global batch of the permutation, so processes never
overlap and the global batches are those of one process; the position is a pair of integers, saved and
restored exactly.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

import jax
import numpy as np

from advalign_jax.data import target_files as F
from advalign_jax.data.config_block import reader_config
from advalign_jax.data.images import load_arrays
from advalign_jax.data.reader import ClickMeReader
from advalign_jax.errors import ConfigError, DataError


class ArrayBatches:
    """An endless, checkpointable stream of batches from in-memory arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, targets: Optional[np.ndarray] = None):
        if len(images) < batch_size * process_count:
            raise ConfigError(f"the training split has {len(images)} examples, fewer than one global batch "
                              f"({batch_size * process_count})")
        self.images, self.labels, self.targets = images, labels, targets
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        b, pc = self.batch_size, self.process_count
        usable = len(order) // (b * pc) * b * pc
        # Global batch k is order[k*b*pc : (k+1)*b*pc]; this process holds its contiguous block of each,
        # so the global batches (examples and order) are those of one process, for any process count.
        return order[:usable].reshape(-1, pc, b)[:, self.process_index].reshape(-1)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position + self.batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        batch = {"image": self.images[idx], "label": self.labels[idx], "index": idx.astype(np.int32)}
        if self.targets is not None:
            batch["targets"] = np.asarray(self.targets[idx], np.float32)
        return batch

    def save(self, prefix: str) -> None:
        with open(prefix + ".json", "w") as f:
            json.dump({"epoch": self.epoch, "position": self.position}, f)

    def restore(self, prefix: str) -> None:
        with open(prefix + ".json") as f:
            state = json.load(f)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def train_arrays(config):
    """(images, labels) of the training split named by ``config.arrays``."""
    a = config.arrays
    return load_arrays(a.source, a.train_split, a.data_dir or None, a.limit if a.limit > 0 else None)


IMAGE_RANGES = {"0_1": (0.0, 1.0), "-1_1": (-1.0, 1.0)}
TARGET_IMAGES = ("verify", "file")


def load_target_file(obj, num_classes: int):
    """The :class:`~advalign_jax.data.target_files.TargetSet` of ``objective.targets_file`` (.npy,
    .npz, .pt or a TFRecord shard pattern), with labels from ``objective.targets_labels_file`` when set,
    images mapped to [0, 1] from ``objective.targets_image_range``."""
    if not obj.targets_file:
        raise ConfigError("objective.target_source='precomputed' needs objective.targets_file")
    if obj.targets_image_range not in IMAGE_RANGES:
        raise ConfigError(f"objective.targets_image_range must be one of {', '.join(IMAGE_RANGES)}, "
                          f"got {obj.targets_image_range!r}")
    if obj.targets_file.endswith(".tfrecords"):  # a shard pattern written by `advalign-jax targets --shards`
        shards = sorted(glob.glob(obj.targets_file))
        if not shards:
            raise DataError(f"{obj.targets_file}: no such file (objective.targets_file)")
        loaded = F.read_target_records(shards, num_classes=num_classes)
    elif not os.path.exists(obj.targets_file):
        raise DataError(f"{obj.targets_file}: no such file (objective.targets_file)")
    else:
        loaded = F.load_targets(obj.targets_file, num_classes=num_classes)
    if obj.targets_labels_file:
        labels = F.load_labels(obj.targets_labels_file)
        if len(labels) != len(loaded.images):
            raise DataError(f"{obj.targets_labels_file}: {len(labels)} labels for the {len(loaded.images)} images "
                            f"of {obj.targets_file}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{obj.targets_labels_file}: labels must be in 0..{num_classes - 1}, "
                            f"found {labels.min()}..{labels.max()}")
        loaded.labels = labels
    if obj.targets_image_range != "0_1":
        loaded.images = F.rescale_images(loaded.images, IMAGE_RANGES[obj.targets_image_range], (0.0, 1.0))
    return loaded


def precomputed_training_set(config):
    """``(images, labels, targets)`` to train on with precomputed target gradients.

    ``objective.targets_images``:

    - ``'file'``: the target file's own images and labels, as the official code trains
      (``TRAIN_CIFAR10.py`` reads ``c10_sbg_data.pt`` and ``c10_sbg_label.pt``); ``arrays.limit`` keeps
      the first N. The test split still comes from ``config.arrays``.
    - ``'verify'`` (the default): the training split of ``config.arrays``; the file must hold the same
      images in the same order, checked image by image (no value may differ by more than
      ``target_files.SAME_IMAGE_ATOL`` in [0, 1] units) and label by label when it has labels. The first
      mismatch is one :class:`DataError` line naming the file and the index.
    """

    obj = config.objective
    if obj.targets_images not in TARGET_IMAGES:
        raise ConfigError(f"objective.targets_images must be one of {', '.join(TARGET_IMAGES)}, "
                          f"got {obj.targets_images!r}")
    loaded = load_target_file(obj, int(config.model.options.num_classes))
    name = obj.targets_file
    if obj.targets_images == "file":
        if loaded.labels is None:
            raise ConfigError(f"{name} holds no labels; objective.targets_images='file' trains on the file's images "
                              f"and needs their labels in objective.targets_labels_file (the official "
                              f"c10_sbg_label.pt)")
        n = config.arrays.limit if config.arrays.limit > 0 else len(loaded.images)
        return loaded.images[:n], np.asarray(loaded.labels[:n], np.int32), loaded.targets[:n]
    images, labels = train_arrays(config)
    if len(loaded.images) != len(images) or loaded.images.shape[1:] != images.shape[1:]:
        raise DataError(f"{name}: targets for {len(loaded.images)} images of shape {loaded.images.shape[1:]}, but the "
                        f"training split has {len(images)} of shape {images.shape[1:]}")
    bad = F.first_differing_image(loaded.images, images)
    if bad is not None:
        raise DataError(f"{name}: image {bad[0]} is not image {bad[0]} of the training split (max |difference| "
                        f"{bad[1]:.3g} in [0, 1] units): the targets belong to other images or another order "
                        f"(objective.targets_images='file' trains on the file's own images)")
    if loaded.labels is not None:
        wrong = np.flatnonzero(np.asarray(loaded.labels) != np.asarray(labels))
        if wrong.size:
            i = int(wrong[0])
            raise DataError(f"{name}: image {i} is labelled {int(loaded.labels[i])}, but the training split labels "
                            f"it {int(labels[i])}")
    return images, labels, loaded.targets


def make(kind: str, config, per_process_batch: int):
    """The training stream named by ``config.data_kind``: the ClickMe reader's training batches
    (``'clickme'``, :meth:`advalign_jax.data.reader.ClickMeReader.train_batches`) or :class:`ArrayBatches`
    (``'arrays'``); a checkpointable iterator of this process's NumPy batches either way."""
    if kind == "clickme":
        return ClickMeReader(reader_config(config.data, per_process_batch=per_process_batch)).train_batches()
    if kind != "arrays":
        raise ConfigError(f"data_kind must be 'clickme' or 'arrays', got {kind!r}")
    obj = config.objective
    if obj.name == "pag" and obj.target_source == "precomputed":
        images, labels, targets = precomputed_training_set(config)
    else:
        images, labels = train_arrays(config)
        targets = None
    return ArrayBatches(images, labels, per_process_batch, int(config.seed), jax.process_index(),
                        jax.process_count(), targets)
