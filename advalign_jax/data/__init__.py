"""Data: ClickMe TFRecords read through tf.data, the writer, synthetic ClickMe and the embedded data.

- :mod:`records`: the record schema, the two real encodings, detection and validation;
- :mod:`preprocess`: the reference preprocessing (resize, blur, heatmap pipeline, training variant);
- :mod:`reader`: :class:`ClickMeReader` (eval and train modes, sharding, mixing, padding + masks);
- :mod:`writer`, :mod:`synthetic`: writing shards, and learnable synthetic ClickMe data;
- :mod:`inspect`: ``advalign-jax data inspect``.

TensorFlow is imported lazily with accelerators hidden (:mod:`tf_env`).
"""

import glob as _glob
import os as _os

EMBEDDED_DIR = _os.path.join(_os.path.dirname(__file__), "embedded")


def embedded_files(split: str = "val") -> list:
    """Paths of the embedded synthetic ClickMe shards of ``split`` ('val' or 'train')."""
    return sorted(_glob.glob(_os.path.join(EMBEDDED_DIR, f"{split}-*.tfrecords")))
