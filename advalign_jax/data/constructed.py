"""The files of a constructed dataset (``advalign-jax construct``): ``dataset.npz`` and ``dataset.json``.

``dataset.npz`` holds ``image`` (N, H, W, C) float32 in [0, 1], ``label`` (N,) int32 (the label the set
assigns), ``source_label``, ``seed_index`` and ``index``; ``dataset.json`` the recipe, the data it was
built from (``data.source``, ``data.split``) and the source model's path and fingerprint. The arrays
are written whole by one atomic rename after every image is done, so a directory either holds a finished
set or none. As a data source, ``constructed:DIR`` gives the constructed set for the split it was built
from and the original data for any other split (:func:`advalign_jax.data.images.load_arrays`).
"""

from __future__ import annotations

import os

import numpy as np

from advalign_jax import store
from advalign_jax.errors import DataError

FORMAT = "advalign_jax constructed dataset 1"
PREFIX = "constructed:"


def read_meta(directory: str) -> dict:
    """``dataset.json`` of a finished constructed set; one line when there is none."""
    path = os.path.join(directory, "dataset.json")
    meta = store.read_json(path, None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{PREFIX}{directory}: no finished constructed dataset there ({path} is missing or not "
                        f"one); run advalign-jax construct with --config.workdir={directory} first")
    return meta


def read_arrays(directory: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of ``dataset.npz``, checked against ``meta``."""
    path = os.path.join(directory, "dataset.npz")
    try:
        with np.load(path) as f:
            x, y = f["image"], f["label"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: not a readable constructed dataset ({err})") from None
    if len(x) != int(meta["num_examples"]) or len(y) != len(x):
        raise DataError(f"{path}: holds {len(x)} images and {len(y)} labels but {directory}/dataset.json says "
                        f"{meta['num_examples']}")
    return x, y
