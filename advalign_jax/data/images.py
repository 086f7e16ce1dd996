"""Labelled image (and toy point) datasets as in-memory arrays: the PAG training and robustness data.

:func:`load_arrays` takes a source string:

- ``tfds:NAME`` (``cifar10``, ``cifar100``, ``stl10``, ... any TFDS image classification dataset),
  read from the user's ``data_dir`` (nothing is downloaded: a dataset that is not prepared there is
  one clear error saying how to prepare it);
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped with the package,
  works offline), as 3-channel images in [0, 1] upsampled to 16x16 (nearest), split 80/20 by a fixed
  permutation;
- ``toy2d``: the points of the 2-D toy experiment of PAG (Ganz, Kawar, Elad, "Do Perceptually Aligned
  Gradients Imply Robustness?", ICML 2023): six Gaussian modes of std 1 along ``x1`` on the line
  ``x2 = 2 x1``, class 0 centred at ``x1 = -50, -10, 30`` and class 1 at
  ``-30, 10, 50``; 1000 training and 100 test points per mode (6000 / 600);
- ``synthetic``: synthetic ClickMe images (:mod:`advalign_jax.data.synthetic`) at 32 px, 10 classes;
- ``constructed:DIR``: a dataset written by ``advalign-jax construct`` (:mod:`advalign_jax.data.constructed`):
  the constructed images and labels for the split it was built from, the original data for any other
  split (so a model trained on it is tested on the original test set).

Images come back as float32 NHWC in [0, 1], labels as int32.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from advalign_jax.data import constructed, synthetic
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import ConfigError, DataError

TOY_CENTRES = {0: (-50.0, -10.0, 30.0), 1: (-30.0, 10.0, 50.0)}


def toy2d(split: str = "train", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The PAG toy data: (points (N, 2) float32, labels (N,) int32), modes in class order."""
    per_mode = {"train": 1000, "test": 100}[split]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    xs, ys = [], []
    for label, centres in TOY_CENTRES.items():
        for c in centres:
            x1 = rng.normal(c, 1.0, size=per_mode)
            xs.append(np.stack([x1, 2.0 * x1], axis=1))
            ys.append(np.full(per_mode, label))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int32)


def digits(split: str = "train", size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (N, size, size, 3) float32 in [0, 1]; 80/20 split."""
    try:
        from sklearn.datasets import load_digits  # heavy import, needed only by the 'digits' source
    except ImportError:
        raise ConfigError("the 'digits' source needs scikit-learn (pip install scikit-learn)") from None
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    reps = size // 8
    images = np.repeat(np.repeat(images, reps, axis=1), reps, axis=2)[..., None].repeat(3, axis=-1)
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    idx = order[:cut] if split == "train" else order[cut:]
    return images[idx], data.target[idx].astype(np.int32)


def synthetic_images(split: str = "train", size: int = 32, num: Optional[int] = None):
    num = num or (2000 if split == "train" else 500)
    spec = synthetic.SynthSpec(size=size, seed=0 if split == "train" else 1, cue="none")
    examples = [synthetic.make_example(i, spec) for i in range(num)]
    return (np.stack([e[0] for e in examples]) / 255.0).astype(np.float32), np.array([e[2] for e in examples],
                                                                                      np.int32)


def tfds_arrays(name: str, split: str, data_dir: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    """A prepared TFDS dataset split as arrays (images scaled to [0, 1])."""
    import_tf()
    import tensorflow_datasets as tfds  # heavy import, needed only by 'tfds:' sources (after import_tf)

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as err:  # DatasetNotFoundError and friends differ across tfds versions
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot open TFDS dataset {name!r}: {first}") from None
    try:
        ds = builder.as_dataset(split=split, as_supervised=True, batch_size=-1)
    except AssertionError:
        raise DataError(f"TFDS dataset {name!r} is not prepared in data_dir={builder.data_dir!r}: run "
                        f"`tfds build {name} --data_dir=DIR` on a machine with internet (or copy a prepared "
                        f"copy there) and pass that DIR as data_dir") from None
    except ValueError as err:
        raise ConfigError(f"TFDS dataset {name!r}: {str(err).splitlines()[0]}") from None
    images, labels = tfds.as_numpy(ds)
    return (images.astype(np.float32) / 255.0), labels.astype(np.int32)


def load_arrays(source: str, split: str = "train", data_dir: Optional[str] = None,
                limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of ``source`` (module docstring); ``limit`` keeps the first N examples."""
    if source.startswith(constructed.PREFIX):
        directory = source[len(constructed.PREFIX):]
        meta = constructed.read_meta(directory)
        if split != meta["data"]["split"]:
            return load_arrays(meta["data"]["source"], split, data_dir or meta["data"]["data_dir"] or None, limit)
        x, y = constructed.read_arrays(directory, meta)
    elif source.startswith("tfds:"):
        x, y = tfds_arrays(source[len("tfds:"):], split, data_dir)
    elif source == "digits":
        x, y = digits(split)
    elif source == "toy2d":
        x, y = toy2d(split)
    elif source == "synthetic":
        x, y = synthetic_images(split)
    else:
        raise ConfigError(f"unknown data source {source!r}: use tfds:NAME, digits, toy2d, synthetic or "
                          "constructed:DIR")
    if limit is not None and limit >= 0:
        x, y = x[:limit], y[:limit]
    return x, y
