"""The ClickMe record: schema, the two real byte encodings, encoding detection and validation.

Every ClickMe record is a ``tf.train.Example`` with three features, as the two public readers parse
them: serre-lab/Harmonization ``harmonization/common/clickme_dataset.py`` (``FEATURE_DESCRIPTION``,
JPEG bytes) and serre-lab/Adversarial-Alignment ``adversarial_alignment/scripts/dataset.py`` (raw
float32 bytes, 224x224):

==========  =======  ==================================================================
key         type     meaning
==========  =======  ==================================================================
``image``   bytes    RGB image: a JPEG (harmonization shards, 256x256) or raw float32
                     bytes of shape (S, S, 3), values 0..255 (adversarial-alignment subset,
                     S = 224; an older validation file has S = 256)
``heatmap`` bytes    human map, one channel: a JPEG, or raw float32 bytes of shape (S, S, 1)
``label``   int64    ImageNet class index, 0-based
==========  =======  ==================================================================

Detection rule, applied per record and per feature: bytes that begin with the JPEG start-of-image
marker ``FF D8 FF`` are a JPEG; otherwise bytes whose length is ``4 * C * S * S`` for an integer S are
raw float32 (C = 3 for the image, 1 for the map); anything else is rejected. The JPEG test comes
first because a JPEG's length can happen to be of that form, whereas raw floats in 0..255 start with
the JPEG marker with probability below 2**-24.

Two forms of the same checks exist: :func:`parse_example_tf` runs inside ``tf.data`` and returns a
status code per record (so a bad record is reported, or skipped and counted, without stopping the
pipeline); :func:`describe_record` runs in Python on one serialized record and returns what it holds or
what is wrong with it, for ``data inspect`` and for locating the record behind a TensorFlow error.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from advalign_jax.data.tf_env import import_tf

JPEG = "jpeg"
RAW = "raw_float32"
ENCODINGS = (JPEG, RAW)
JPEG_MAGIC = b"\xff\xd8\xff"

# Status codes of parse_example_tf, with the sentence the user sees.
OK = 0
STATUS_MESSAGES = {
    1: "the record has no 'image' feature",
    2: "the record has no 'heatmap' feature",
    3: "the record has no 'label' feature",
    4: "'image' bytes are neither a JPEG nor raw float32 of shape (S, S, 3)",
    5: "'heatmap' bytes are neither a JPEG nor raw float32 of shape (S, S, 1)",
    6: "label is outside the configured class range",
    7: "raw float32 'image' holds non-finite values",
    8: "raw float32 'heatmap' holds non-finite values",
    9: "the heatmap's height and width do not match the image's",
    10: "'image' encoding differs from the configured encoding",
    11: "'heatmap' encoding differs from the configured encoding",
}


def raw_side(num_bytes: int, channels: int) -> Optional[int]:
    """S such that ``num_bytes == 4 * channels * S * S``, or None."""
    if num_bytes <= 0 or num_bytes % (4 * channels):
        return None
    side = int(round(np.sqrt(num_bytes / (4 * channels))))
    return side if 4 * channels * side * side == num_bytes else None


def detect_encoding(data: bytes, channels: int) -> Optional[str]:
    """The encoding of one feature's bytes (``'jpeg'``, ``'raw_float32'``) or None if neither fits."""
    if data[:3] == JPEG_MAGIC:
        return JPEG
    if raw_side(len(data), channels) is not None:
        return RAW
    return None


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _bytes_feature(value: bytes):
    tf = import_tf()
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def encode_feature(array: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    """Bytes of one image-like array (H, W, C) in the given encoding.

    JPEG takes uint8 (or values that round to 0..255); raw float32 takes values in 0..255 and stores
    them little-endian, row-major (H, W, C), as ``tf.io.decode_raw(..., tf.float32)`` reads them.
    """
    tf = import_tf()
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if encoding == JPEG:
        data = np.clip(np.round(array), 0, 255).astype(np.uint8)
        return tf.io.encode_jpeg(data, quality=jpeg_quality, chroma_downsampling=False).numpy()
    if encoding == RAW:
        return np.ascontiguousarray(array, dtype="<f4").tobytes()
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def make_example(image_bytes: bytes, heatmap_bytes: bytes, label: int) -> bytes:
    """A serialized ``tf.train.Example`` with the ClickMe keys."""
    tf = import_tf()
    feature = {
        "image": _bytes_feature(image_bytes),
        "heatmap": _bytes_feature(heatmap_bytes),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def encode_example(image: np.ndarray, heatmap: np.ndarray, label: int, encoding: str,
                   jpeg_quality: int = 95) -> bytes:
    """A serialized ClickMe record from arrays: image (H, W, 3), heatmap (H, W[, 1]), values 0..255."""
    return make_example(encode_feature(image, encoding, jpeg_quality),
                        encode_feature(heatmap, encoding, jpeg_quality), label)


# ----------------------------------------------------------------------------------------------------
# Python-side description and validation of one record
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RecordInfo:
    """What one serialized record holds, or the first problem found in it (``problem``)."""

    encoding: Optional[str] = None
    image_shape: Optional[tuple] = None
    heatmap_shape: Optional[tuple] = None
    label: Optional[int] = None
    image: Optional[np.ndarray] = None  # float32 (H, W, 3), 0..255, when decode=True
    heatmap: Optional[np.ndarray] = None  # float32 (H, W), when decode=True
    problem: Optional[str] = None


def _decode_feature_py(data: bytes, channels: int, name: str, encoding: Optional[str]):
    """(encoding, float32 array (H, W, C)) or raises ValueError with the user-facing sentence."""
    tf = import_tf()
    found = detect_encoding(data, channels)
    if found is None:
        shape = "(S, S, 3)" if channels == 3 else "(S, S, 1)"
        raise ValueError(f"'{name}' bytes ({len(data)} bytes) are neither a JPEG nor raw float32 of "
                         f"shape {shape}")
    if encoding not in (None, "auto") and found != encoding:
        raise ValueError(f"'{name}' is {found} but the configured encoding is {encoding}")
    if found == JPEG:
        try:
            array = tf.io.decode_jpeg(data, channels=channels).numpy().astype(np.float32)
        except tf.errors.OpError as err:
            raise ValueError(f"'{name}' is not a decodable JPEG ({err.message.splitlines()[0]})") from None
    else:
        side = raw_side(len(data), channels)
        array = np.frombuffer(data, dtype="<f4").reshape(side, side, channels).astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise ValueError(f"raw float32 '{name}' holds non-finite values")
    return found, array


def describe_record(serialized: bytes, num_classes: Optional[int] = None, encoding: str = "auto",
                    decode: bool = False) -> RecordInfo:
    """Parses and checks one serialized ClickMe record in Python.

    Returns a :class:`RecordInfo`; ``problem`` is None for a valid record, else the first problem in
    the order: not an Example, missing or mistyped feature, undecodable bytes, non-finite raw values,
    map/image size mismatch, label out of ``[0, num_classes)``.
    """
    tf = import_tf()
    info = RecordInfo()
    try:
        example = tf.train.Example.FromString(serialized)
    except Exception:  # protobuf's DecodeError is not exported uniformly across versions
        info.problem = "the record is not a serialized tf.train.Example"
        return info
    feats = example.features.feature
    for key, kind in (("image", "bytes_list"), ("heatmap", "bytes_list"), ("label", "int64_list")):
        if key not in feats:
            info.problem = f"the record has no '{key}' feature"
            return info
        if feats[key].WhichOneof("kind") != kind or len(getattr(feats[key], kind).value) != 1:
            info.problem = f"feature '{key}' must hold exactly one {kind.split('_')[0]} value"
            return info
    info.label = int(feats["label"].int64_list.value[0])
    try:
        enc_i, image = _decode_feature_py(feats["image"].bytes_list.value[0], 3, "image", encoding)
        enc_h, heatmap = _decode_feature_py(feats["heatmap"].bytes_list.value[0], 1, "heatmap", encoding)
    except ValueError as err:
        info.problem = str(err)
        return info
    info.encoding = enc_i if enc_i == enc_h else f"{enc_i}+{enc_h}"
    info.image_shape, info.heatmap_shape = image.shape, heatmap.shape
    if image.shape[:2] != heatmap.shape[:2]:
        info.problem = (f"the heatmap's size {heatmap.shape[:2]} does not match the image's "
                        f"{image.shape[:2]}")
        return info
    if num_classes is not None and not 0 <= info.label < num_classes:
        info.problem = f"label {info.label} is outside the configured class range [0, {num_classes})"
        return info
    if decode:
        info.image, info.heatmap = image, heatmap[..., 0]
    return info


# ----------------------------------------------------------------------------------------------------
# In-graph parsing (tf.data)
# ----------------------------------------------------------------------------------------------------


def _decode_feature_tf(data, channels: int, encoding: str):
    """Decodes one feature in graph: (float32 (H, W, C), bytes_ok, finite, encoding_ok, is_jpeg)."""
    tf = import_tf()
    n = tf.strings.length(data)
    side = tf.cast(tf.round(tf.sqrt(tf.cast(n, tf.float64) / (4.0 * channels))), tf.int32)
    is_raw_size = tf.logical_and(n > 0, side * side * 4 * channels == n)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), JPEG_MAGIC)
    is_raw = tf.logical_and(tf.logical_not(is_jpeg), is_raw_size)
    if encoding == JPEG:
        enc_ok = is_jpeg
    elif encoding == RAW:
        enc_ok = is_raw
    else:
        enc_ok = tf.constant(True)

    def jpeg():
        return tf.cast(tf.io.decode_jpeg(data, channels=channels), tf.float32), tf.constant(True)

    def raw():
        array = tf.reshape(tf.io.decode_raw(data, tf.float32, little_endian=True), [side, side, channels])
        finite = tf.reduce_all(tf.math.is_finite(array))
        return tf.cond(finite, lambda: array, lambda: tf.zeros_like(array)), finite

    def bad():
        return tf.zeros([1, 1, channels], tf.float32), tf.constant(True)

    # Nested conds rather than tf.case, and no elementwise pass over JPEG pixels: both halve tf.data
    # throughput on CPU (benchmarks/reader_throughput.py).
    array, finite = tf.cond(tf.logical_and(is_jpeg, enc_ok), jpeg,
                            lambda: tf.cond(tf.logical_and(is_raw, enc_ok), raw, bad))
    return array, tf.logical_or(is_jpeg, is_raw), finite, enc_ok, is_jpeg


def parse_example_tf(serialized, num_classes: int, encoding: str = "auto"):
    """Parses one ClickMe record inside tf.data without raising on bad content.

    Returns a dict: ``image`` float32 (H, W, 3) and ``heatmap`` float32 (H, W, 1), both in the file's
    value range (0..255), ``label`` int32, ``status`` int32 (0 = valid, else a key of
    :data:`STATUS_MESSAGES`) and ``image_is_jpeg`` / ``heatmap_is_jpeg`` (bool). A bad record's arrays are zeros of shape (1, 1, C). Features of the wrong
    protobuf type, or a JPEG whose payload is corrupt, still raise a TensorFlow error; the reader then
    locates the record with :func:`describe_record`.
    """
    tf = import_tf()
    spec = {
        "image": tf.io.VarLenFeature(tf.string),
        "heatmap": tf.io.VarLenFeature(tf.string),
        "label": tf.io.VarLenFeature(tf.int64),
    }
    feats = tf.io.parse_single_example(serialized, spec)
    counts = {k: tf.shape(feats[k].values)[0] for k in spec}
    image_bytes = tf.cond(counts["image"] > 0, lambda: feats["image"].values[0], lambda: tf.constant(b""))
    heatmap_bytes = tf.cond(counts["heatmap"] > 0, lambda: feats["heatmap"].values[0],
                            lambda: tf.constant(b""))
    label = tf.cond(counts["label"] > 0, lambda: feats["label"].values[0], lambda: tf.constant(-1, tf.int64))

    image, image_ok, image_finite, image_enc, image_jpeg = _decode_feature_tf(image_bytes, 3, encoding)
    heatmap, heatmap_ok, heatmap_finite, heatmap_enc, heatmap_jpeg = _decode_feature_tf(
        heatmap_bytes, 1, encoding)
    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(heatmap)[:2]))
    label_ok = tf.logical_and(label >= 0, label < num_classes)

    checks = [  # (status, condition that must hold), first failure wins
        (1, counts["image"] > 0), (2, counts["heatmap"] > 0), (3, counts["label"] > 0),
        (4, image_ok), (5, heatmap_ok), (10, image_enc), (11, heatmap_enc),
        (7, image_finite), (8, heatmap_finite), (9, same_size), (6, label_ok),
    ]
    status = tf.constant(OK, tf.int32)
    for code, cond in reversed(checks):
        status = tf.where(cond, status, tf.constant(code, tf.int32))
    return {"image": image, "heatmap": heatmap, "label": tf.cast(label, tf.int32), "status": status,
            "image_is_jpeg": image_jpeg, "heatmap_is_jpeg": heatmap_jpeg}
