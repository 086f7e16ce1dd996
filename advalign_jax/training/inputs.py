"""Training streams over in-memory arrays (``data_kind='arrays'``): TFDS datasets, digits, the toy 2-D
data, synthetic images (:func:`advalign_jax.data.images.load_arrays`).

The stream shuffles the training split with a fresh permutation per epoch drawn from ``(seed, epoch)``
and yields batches of ``image`` (un-augmented: objectives that augment do it inside the loss, so the
input-gradient stays in the frame of the stored image), ``label`` and ``index`` (the example's
position in the split, for nearest-neighbour self-exclusion and precomputed targets). With
precomputed target gradients (``objective.target_source='precomputed'``) each batch also carries
``targets`` (N, C, *image_shape), gathered from the loaded file.

Each process reads every ``process_count``-th example of the permutation, so processes never overlap;
the position is a pair of integers, saved and restored exactly.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

import numpy as np

from advalign_jax.data.images import load_arrays
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
        usable = len(order) // (self.batch_size * self.process_count) * self.batch_size * self.process_count
        return order[:usable][self.process_index::self.process_count]

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


def make(kind: str, config, per_process_batch: int):
    """The training stream for ``config.data_kind``."""
    import jax  # pylint: disable=import-outside-toplevel

    if kind != "arrays":
        raise ConfigError(f"data_kind must be 'clickme' or 'arrays', got {kind!r}")
    images, labels = train_arrays(config)
    targets = None
    obj = config.objective
    if obj.name == "pag" and obj.target_source == "precomputed":
        from advalign_jax.losses import pag_targets  # pylint: disable=import-outside-toplevel

        if not obj.targets_file:
            raise ConfigError("objective.target_source='precomputed' needs objective.targets_file")
        num_classes = int(config.model.options.num_classes)
        if obj.targets_file.endswith(".tfrecords"):  # a shard pattern written by `advalign-jax targets --shards`
            shards = sorted(glob.glob(obj.targets_file))
            if not shards:
                raise DataError(f"{obj.targets_file}: no such file (objective.targets_file)")
            loaded = pag_targets.read_target_records(shards, num_classes=num_classes)
        elif not os.path.exists(obj.targets_file):
            raise DataError(f"{obj.targets_file}: no such file (objective.targets_file)")
        else:
            loaded = pag_targets.load_targets(obj.targets_file, num_classes=num_classes)
        if len(loaded.images) != len(images) or loaded.images.shape[1:] != images.shape[1:]:
            raise DataError(f"{obj.targets_file}: targets for {len(loaded.images)} images of shape "
                            f"{loaded.images.shape[1:]}, but the training split has {len(images)} of shape "
                            f"{images.shape[1:]}")
        targets = loaded.targets
    return ArrayBatches(images, labels, per_process_batch, int(config.seed), jax.process_index(),
                        jax.process_count(), targets)
