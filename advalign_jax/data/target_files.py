"""Files of precomputed PAG target gradients: the official stacked layout and TFRecord shards.

The official layout stores each image followed by its C target gradients, one array of shape
(N, 1 + C, *image_shape); the official score-based files are (N, 1 + C, 3, 32, 32) NCHW ``.pt``. This
project writes ``.npy`` / ``.npz`` (:func:`save_targets`; the ``.npz`` records its layout and labels)
and, for sets too large for one array, TFRecord shards of one ``tf.train.Example`` per image
(:func:`write_target_records`). Reading validates everything a training run relies on and names the
first problem in one line (:class:`advalign_jax.errors.DataError`): shapes, class count, labels,
non-finite values, a damaged or truncated file. The target computations themselves are in
:mod:`advalign_jax.losses.pag_targets`.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Iterator, Optional, Sequence

import numpy as np

from advalign_jax.data import writer
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import DataError

NHWC, NCHW, AUTO = "nhwc", "nchw", "auto"
LAYOUTS = (NHWC, NCHW)


@dataclasses.dataclass
class TargetSet:
    """Images (N, *image_shape) NHWC, targets (N, C, *image_shape), labels (N,) or None."""

    images: np.ndarray
    targets: np.ndarray
    labels: Optional[np.ndarray] = None

    @property
    def num_classes(self) -> int:
        return int(self.targets.shape[1])


def rescale_images(images, src=(-1.0, 1.0), dst=(0.0, 1.0)):
    """Maps images affinely from the range ``src`` to ``dst`` (the official [-1, 1] to the project's
    [0, 1] by default). Targets need no conversion (see the module docstring)."""
    a = (dst[1] - dst[0]) / (src[1] - src[0])
    return ((np.asarray(images, np.float32) - src[0]) * a + dst[0]).astype(np.float32)


def detect_layout(shape: Sequence[int], source: str = "targets") -> str:
    """NCHW or NHWC for a stacked array (N, 1 + C, a, b, c): the axis of size 1 or 3 that the other
    end does not also have; 3-D arrays (N, 1 + C, D) (points) have no layout (NHWC is returned)."""
    if len(shape) == 3:
        return NHWC
    if len(shape) != 5:
        raise DataError(f"{source}: expected an array of shape (N, 1 + C, *image_shape), got {tuple(shape)}")
    first, last = shape[2] in (1, 3), shape[4] in (1, 3)
    if first and not last:
        return NCHW
    if last and not first:
        return NHWC
    raise DataError(f"{source}: cannot tell NCHW from NHWC for shape {tuple(shape)}; pass layout='nchw' or "
                    f"layout='nhwc'")


def stack_targets(images, targets, layout: str = NHWC) -> np.ndarray:
    """The reference layout: (N, 1 + C, *image_shape), each image followed by its C targets; images
    and targets are given NHWC and stored in ``layout`` ('nchw' = the official files)."""
    images, targets = np.asarray(images, np.float32), np.asarray(targets, np.float32)
    data = np.concatenate([images[:, None], targets], axis=1)
    if layout == NCHW and data.ndim == 5:
        data = np.ascontiguousarray(np.moveaxis(data, -1, 2))
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return data


def _first_nonfinite(data, chunk: int = 512):
    """(image index, slot) of the first non-finite value of a stacked array, or None (chunked, so a
    memory-mapped file is not loaded at once)."""
    for start in range(0, data.shape[0], chunk):
        block = np.asarray(data[start:start + chunk])
        ok = np.isfinite(block.reshape(block.shape[0], block.shape[1], -1)).all(axis=-1)
        if not ok.all():
            i, j = np.argwhere(~ok)[0]
            return start + int(i), int(j)
    return None


def _nonfinite_message(source: str, i: int, slot: int) -> str:
    if slot == 0:
        return f"{source}: image {i} holds non-finite values"
    return f"{source}: the target gradient of image {i} for class {slot - 1} holds non-finite values"


def split_stacked(data, layout: str = AUTO, num_classes: Optional[int] = None,
                  image_shape: Optional[Sequence[int]] = None, labels=None,
                  source: str = "targets") -> TargetSet:
    """Validates a stacked (N, 1 + C, ...) array and returns it as NHWC images and targets.

    One :class:`DataError` line names ``source`` and what is wrong: a shape that is not
    (N, 1 + C, *image_shape), a class count other than ``num_classes``, an image shape other than
    ``image_shape`` (NHWC), labels that do not match, or the first non-finite image or target (its
    index and class).
    """
    shape = tuple(data.shape)
    if len(shape) < 3 or shape[1] < 2:
        raise DataError(f"{source}: expected an array of shape (N, 1 + C, *image_shape), got {shape}")
    if layout == AUTO:
        layout = detect_layout(shape, source)
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS + (AUTO,)}, got {layout!r}")
    if num_classes is not None and shape[1] != 1 + num_classes:
        raise DataError(f"{source}: holds {shape[1] - 1} target gradients per image but the data has "
                        f"{num_classes} classes (expected shape (N, 1 + {num_classes}, ...), got {shape})")
    img_shape = shape[2:]
    if layout == NCHW and len(img_shape) == 3:
        img_shape = (img_shape[1], img_shape[2], img_shape[0])
    if image_shape is not None and tuple(image_shape) != img_shape:
        raise DataError(f"{source}: holds images of shape {img_shape} ({layout.upper()} read as NHWC) but "
                        f"the data's images have shape {tuple(image_shape)}")
    if labels is not None:
        labels = np.asarray(labels).astype(np.int32).reshape(-1)
        if len(labels) != shape[0]:
            raise DataError(f"{source}: holds {shape[0]} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= shape[1] - 1):
            raise DataError(f"{source}: labels must be in 0..{shape[1] - 2}, "
                            f"found {labels.min()}..{labels.max()}")
    bad = _first_nonfinite(data)
    if bad is not None:
        raise DataError(_nonfinite_message(source, *bad))
    arr = np.asarray(data, np.float32)
    if layout == NCHW and arr.ndim == 5:
        arr = np.moveaxis(arr, 2, -1)
    return TargetSet(np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1:]), labels)


def save_targets(path: str, images, targets, labels=None, layout: str = NHWC) -> str:
    """Writes the stacked layout: ``.npy`` (the array only) or ``.npz`` (``data``, ``layout`` and,
    when given, ``labels``). Written to a temporary name and renamed when complete."""
    data = stack_targets(images, targets, layout)
    if labels is not None and len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    ext = os.path.splitext(path)[1]
    tmp = f"{path}.tmp-{os.getpid()}{ext}"
    try:
        if ext == ".npy":
            np.save(tmp, data)
        elif ext == ".npz":
            extra = {} if labels is None else {"labels": np.asarray(labels, np.int32)}
            np.savez(tmp, data=data, layout=np.array(layout), **extra)
        else:
            raise DataError(f"{path}: target files are .npy or .npz (or TFRecords via write_target_records)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _load_array(path: str, what: str):
    ext = os.path.splitext(path)[1]
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    try:
        if ext == ".npy":
            return np.load(path, mmap_mode="r"), None, None
        if ext == ".npz":
            with np.load(path) as z:
                if "data" not in z:
                    raise DataError(f"{path}: an .npz of {what} needs a 'data' array "
                                    f"(found {', '.join(z.files)})")
                layout = str(z["layout"]) if "layout" in z else None
                labels = z["labels"] if "labels" in z else None
                return z["data"], layout, labels
        if ext == ".pt":  # the official release (torch.save of a tensor)
            import torch  # optional: only to read the official .pt files

            return torch.load(path, map_location="cpu", weights_only=True).numpy(), None, None
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot read it as {what} ({first}); the file is damaged or cut short: "
                        "write it again (advalign-jax targets)") from None
    raise DataError(f"{path}: {what} are read from .npy, .npz or .pt files")


def load_labels(path: str) -> np.ndarray:
    """Labels from a .npy, .npz (``labels`` or ``data``) or .pt file (the official ``c10_sbg_label.pt``),
    as a 1-D int32 array."""
    data, _, labels = _load_array(path, "labels")
    arr = np.asarray(labels if labels is not None else data)
    if arr.ndim != 1 and not (arr.ndim == 2 and 1 in arr.shape):
        raise DataError(f"{path}: labels must be a 1-D array, got shape {arr.shape}")
    return arr.reshape(-1).astype(np.int32)


# Two images are the same image when no value differs by more than this, in [0, 1] units: room for a
# range conversion's float32 rounding (about 1e-7), far below one 8-bit grey level (1/255).
SAME_IMAGE_ATOL = 1e-5


def first_differing_image(a, b, atol: float = SAME_IMAGE_ATOL, chunk: int = 1024):
    """``(i, max |a_i - b_i|)`` for the first index i where images ``a`` and ``b`` (same shape (N, ...))
    differ by more than ``atol`` anywhere, else None (in chunks, so memory-mapped files stay on disk)."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"images of shapes {np.shape(a)} and {np.shape(b)} cannot be compared")
    n = np.shape(a)[0]
    for start in range(0, n, chunk):
        d = np.abs(np.asarray(a[start:start + chunk], np.float32) - np.asarray(b[start:start + chunk], np.float32))
        worst = d.reshape(d.shape[0], -1).max(axis=1) if d.size else np.zeros(len(d))
        bad = np.flatnonzero(~(worst <= atol))  # NaN counts as different
        if bad.size:
            return start + int(bad[0]), float(worst[bad[0]])
    return None


def load_targets(path: str, layout: str = AUTO, num_classes: Optional[int] = None,
                 image_shape: Optional[Sequence[int]] = None, labels=None,
                 labels_path: Optional[str] = None) -> TargetSet:
    """Reads a stacked target file (.npy, .npz, or the official .pt) and validates it
    (:func:`split_stacked`). Labels come from ``labels``, ``labels_path`` (.npy/.npz/.pt, e.g. the
    official ``c10_sbg_label.pt``) or the .npz's ``labels``. An .npz written by :func:`save_targets`
    records its layout."""
    data, stored_layout, stored_labels = _load_array(path, "target gradients")
    if layout == AUTO and stored_layout:
        layout = stored_layout
    if labels is None and labels_path is not None:
        loaded = _load_array(labels_path, "labels")
        labels = loaded[2] if loaded[2] is not None else loaded[0]
    if labels is None:
        labels = stored_labels
    return split_stacked(data, layout, num_classes, image_shape, labels, source=path)


# TFRecords: one tf.train.Example per image.
#   image        bytes   raw little-endian float32, the image (NHWC, image_shape)
#   targets      bytes   raw little-endian float32, (C, *image_shape)
#   image_shape  int64[] the image's shape, e.g. [32, 32, 3] ([2] for the toy points)
#   num_classes  int64   C
#   label        int64   the class (-1 when unknown)
#   index        int64   the image's index in the dataset (orders the set; NN self-exclusion)
RECORD_KEYS = ("image", "targets", "image_shape", "num_classes", "label", "index")


def encode_target_record(image, targets, label: int = -1, index: int = 0) -> bytes:
    """One serialized record of the schema above."""
    tf = import_tf()
    image = np.asarray(image, "<f4")
    targets = np.asarray(targets, "<f4")
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "targets": tf.train.Feature(bytes_list=tf.train.BytesList(value=[targets.tobytes()])),
        "image_shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(image.shape))),
        "num_classes": tf.train.Feature(int64_list=tf.train.Int64List(value=[targets.shape[0]])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(index)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_target_records(out_dir: str, prefix: str, images, targets, labels=None, indices=None,
                         num_shards: int = 1, overwrite: bool = False) -> list:
    """Writes ``{prefix}-{i}.tfrecords`` shards (record j to shard ``j % num_shards``, atomically:
    :func:`advalign_jax.data.writer.write_shards`). Returns the paths."""
    images, targets = np.asarray(images, np.float32), np.asarray(targets, np.float32)
    n = len(images)
    if targets.shape[0] != n or targets.shape[2:] != images.shape[1:]:
        raise DataError(f"targets of shape {targets.shape} do not fit images of shape {images.shape}: "
                        f"expected (N, C, *image_shape)")
    labels = np.full(n, -1) if labels is None else np.asarray(labels)
    indices = np.arange(n) if indices is None else np.asarray(indices)
    return writer.write_shards(out_dir, prefix, num_shards, n,
                               lambda j: encode_target_record(images[j], targets[j], labels[j], indices[j]),
                               overwrite=overwrite)


def _decode_record(serialized: bytes, where: str, num_classes, image_shape):
    tf = import_tf()
    try:
        feats = tf.train.Example.FromString(serialized).features.feature
    except Exception:  # pylint: disable=broad-except  (protobuf's DecodeError)
        raise DataError(f"{where}: not a tf.train.Example") from None
    missing = [k for k in RECORD_KEYS if k not in feats]
    if missing:
        raise DataError(f"{where}: the record has no {missing[0]!r} feature (a PAG target record holds "
                        f"{', '.join(RECORD_KEYS)})")
    shape = tuple(int(v) for v in feats["image_shape"].int64_list.value)
    c = int(feats["num_classes"].int64_list.value[0])
    if image_shape is not None and shape != tuple(image_shape):
        raise DataError(f"{where}: image shape {shape} differs from {tuple(image_shape)}")
    if num_classes is not None and c != num_classes:
        raise DataError(f"{where}: holds {c} target gradients per image but the data has "
                        f"{num_classes} classes")
    size = int(np.prod(shape))
    image_b = feats["image"].bytes_list.value[0]
    targets_b = feats["targets"].bytes_list.value[0]
    if len(image_b) != 4 * size:
        raise DataError(f"{where}: 'image' holds {len(image_b)} bytes, not float32 of shape {shape}")
    if len(targets_b) != 4 * size * c:
        raise DataError(f"{where}: 'targets' holds {len(targets_b)} bytes, "
                        f"not float32 of shape {(c,) + shape}")
    image = np.frombuffer(image_b, "<f4").reshape(shape)
    targets = np.frombuffer(targets_b, "<f4").reshape((c,) + shape)
    index = int(feats["index"].int64_list.value[0])
    if not np.isfinite(image).all():
        raise DataError(f"{where} (image {index}): the image holds non-finite values")
    ok = np.isfinite(targets.reshape(c, -1)).all(axis=1)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{where} (image {index}): the target gradient for class {bad} holds "
                        f"non-finite values")
    label = int(feats["label"].int64_list.value[0])
    if label >= c:
        raise DataError(f"{where} (image {index}): label {label} is outside 0..{c - 1}")
    return image, targets, label, index, shape, c


def iter_target_records(paths: Sequence[str] | str, batch_size: int = 256, num_classes: Optional[int] = None,
                        image_shape: Optional[Sequence[int]] = None) -> Iterator[dict]:
    """Streams validated records as dicts of NumPy batches ``image`` (B, ...), ``targets`` (B, C, ...),
    ``label`` (B,), ``index`` (B,) (file order; the last batch may be smaller). Every record is checked;
    the first bad one is one :class:`DataError` line naming the file and the record."""
    tf = import_tf()
    paths = [paths] if isinstance(paths, str) else list(paths)
    buf = []
    for path in paths:
        if not tf.io.gfile.exists(path):
            raise DataError(f"{path}: no such file")
        i = 0
        try:
            for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
                rec = _decode_record(serialized, f"{path}: record {i}", num_classes, image_shape)
                num_classes, image_shape = rec[5], rec[4]  # later records must agree with the first
                buf.append(rec)
                i += 1
                if len(buf) == batch_size:
                    yield _batch(buf)
                    buf = []
        except tf.errors.DataLossError:
            raise DataError(f"{path}: the file is cut short or damaged after record {i} (a TFRecord "
                            "whose end is missing); write it again (advalign-jax targets)") from None
        except tf.errors.OpError as err:
            raise DataError(f"{path}: record {i} cannot be read ({type(err).__name__}); write the file "
                            "again (advalign-jax targets)") from None
    if buf:
        yield _batch(buf)


def _batch(recs) -> dict:
    return {"image": np.stack([r[0] for r in recs]), "targets": np.stack([r[1] for r in recs]),
            "label": np.array([r[2] for r in recs], np.int32),
            "index": np.array([r[3] for r in recs], np.int64)}


def read_target_records(paths: Sequence[str] | str, num_classes: Optional[int] = None,
                        image_shape: Optional[Sequence[int]] = None) -> TargetSet:
    """All records of the shards as one :class:`TargetSet`, ordered by their ``index``; labels are None
    when the records carry none (-1). Duplicate indices are an error."""
    batches = list(iter_target_records(paths, 4096, num_classes, image_shape))
    if not batches:
        raise DataError(f"{paths}: no records")
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.argsort(cat["index"], kind="stable")
    idx = cat["index"][order]
    dup = np.flatnonzero(np.diff(idx) == 0)
    if dup.size:
        raise DataError(f"{paths}: image index {int(idx[dup[0]])} occurs in more than one record")
    labels = cat["label"][order]
    return TargetSet(cat["image"][order], cat["targets"][order], None if (labels < 0).all() else labels)
