"""Target gradients ``g(x, y_t)`` for PAG training (Ganz, Kawar, Elad, ICML 2023; ``../shared/spec/pag.md``).

Sources, each returning targets of shape (N, C, *image_shape), one per class:

- **Heuristics** ``g(x, y_t) = r(y_t) - x`` for a class representative r (:func:`representative_targets`):
  **One Image** (:func:`one_image_representatives`: one fixed training image per class), **Class Mean**
  (:func:`class_mean_representatives`: the class's mean image, rescaled about a centre) and **Nearest
  Neighbour** (:func:`nearest_neighbour`: the L2-nearest image of class y_t other than x itself, in a
  sample set of that class; on the accelerator, in chunks of the sample set).
- **Score-based gradients** (:func:`score_based_targets`): the difference of a class-conditional and an
  unconditional score at a noise level t, from user-supplied epsilon-prediction functions.
- **Precomputed files** (:func:`load_targets`, :func:`save_targets`, :func:`write_target_records`,
  :func:`read_target_records`): the official layout, each image followed by its C targets, as an array
  of shape (N, 1 + C, *image_shape); the official SBG files are (N, 1 + C, 3, 32, 32) NCHW.

Frames: the project's images are NHWC in [0, 1]; the official code's are in [-1, 1]. The targets are
directions compared by a cosine, and ``x_[0,1] = (x_[-1,1] + 1) / 2`` is an increasing affine map, so a
target gradient keeps its direction in either frame: convert the images (:func:`rescale_images`), never
the targets. (A heuristic ``r - x`` is the same direction in both frames; CM's rescaling is done about
``center``, see :func:`class_mean_representatives`.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.errors import DataError

NHWC, NCHW, AUTO = "nhwc", "nchw", "auto"
LAYOUTS = (NHWC, NCHW)

# ----------------------------------------------------------------------------------------------------
# Heuristic targets: g = r(y_t) - x
# ----------------------------------------------------------------------------------------------------


def _check_classes(labels, num_classes: int, source: str = "labels"):
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels must be in 0..{num_classes - 1}, "
                        f"found {labels.min()}..{labels.max()}")
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(f"{source}: class {int(empty[0])} has no image (a representative needs at least one)")
    return labels


def one_image_representatives(images, labels, num_classes: int, seed: Optional[int] = None):
    """One Image (OI): one fixed training image per class.

    ``seed=None`` picks the first image of each class (in data order); an integer picks a uniformly
    random one with ``numpy.random.default_rng(seed)``. Returns ``(reps (C, ...), indices (C,))``.
    """
    labels = _check_classes(labels, num_classes)
    rng = None if seed is None else np.random.default_rng(seed)
    idx = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        idx.append(members[0] if rng is None else rng.choice(members))
    idx = np.asarray(idx, np.int64)
    return np.asarray(images)[idx].astype(np.float32), idx


def class_mean_representatives(images, labels, num_classes: int, scale="auto", center: float = 0.5):
    """Class Mean (CM): ``r_c = center + s_c * (mean_{i in c} x_i - center)``.

    The paper scales the class mean "by a constant" to an image-like norm without publishing it, so:
    ``scale='auto'`` (the default) sets ``s_c = mean_{i in c} ||x_i - center|| / ||mean_c - center||``,
    making r_c as far from ``center`` as the class's images are on average (a mean image is much
    closer to the centre than any image); a number is a constant s for every class (1.0 = the plain
    mean). ``center=0.5`` is mid-grey for images in [0, 1] (0 in the official [-1, 1] frame, about
    which a constant scaling is a contrast change); use 0.0 for images in [-1, 1] or for the toy
    points. Returns (C, ...) float32.
    """
    labels = _check_classes(labels, num_classes)
    images = np.asarray(images, np.float64)
    reps = []
    for c in range(num_classes):
        members = images[labels == c] - center
        m = members.mean(axis=0)
        if isinstance(scale, str):
            if scale != "auto":
                raise ValueError(f"scale must be 'auto' or a number, got {scale!r}")
            m_norm = np.linalg.norm(m)
            mean_norm = np.mean(np.linalg.norm(members.reshape(len(members), -1), axis=1))
            s = mean_norm / m_norm if m_norm > 0 else 1.0
        else:
            s = float(scale)
        reps.append(center + s * m)
    return np.stack(reps).astype(np.float32)


def representative_targets(x, reps):
    """``g[n, c] = reps[c] - x[n]``: (N, ...) and (C, ...) -> (N, C, ...)."""
    return reps[None] - x[:, None]


# ----------------------------------------------------------------------------------------------------
# Nearest-neighbour targets
# ----------------------------------------------------------------------------------------------------


def nearest_neighbour_bank(images, labels, num_classes: int, sample_size: Optional[int] = None,
                           seed: int = 0):
    """The NN sample set: per class, ``sample_size`` of its images (a seeded random subset, kept in
    data order), or all of them (None). Returns ``(bank (C, S, ...) float32, ids (C, S) int32)``: ids
    are the images' indices in ``images``, -1 where a class has fewer than S images (padding)."""
    labels = _check_classes(labels, num_classes)
    images = np.asarray(images, np.float32)
    rng = np.random.default_rng(seed)
    members = []
    for c in range(num_classes):
        m = np.flatnonzero(labels == c)
        if sample_size is not None and len(m) > sample_size:
            m = np.sort(rng.choice(m, size=sample_size, replace=False))
        members.append(m)
    s = max(len(m) for m in members)
    bank = np.zeros((num_classes, s) + images.shape[1:], np.float32)
    ids = np.full((num_classes, s), -1, np.int32)
    for c, m in enumerate(members):
        bank[c, :len(m)] = images[m]
        ids[c, :len(m)] = m
    return bank, ids


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def nearest_neighbour(x, x_ids, bank, bank_ids, chunk_size: int = 256):
    """Nearest Neighbour (NN) targets: for each query and class c, the L2-nearest entry of ``bank[c]``
    whose id differs from the query's id (self excluded) and is not padding (-1).

    ``x`` (N, ...), ``x_ids`` (N,) the queries' dataset indices (any id < -1 for images outside the
    dataset), ``bank`` (C, S, ...), ``bank_ids`` (C, S). The bank is scanned in chunks of
    ``chunk_size`` entries (``lax.scan``; the last chunk is padded), with squared distances
    ``||x - m||^2 + ||b - m||^2 - 2 (x - m).(b - m)`` about the bank's mean m (full float32 matmul
    precision). Ties go to the earliest bank entry (differences within float32 rounding of the
    distances count as ties or not as rounding falls). Returns ``(targets (N, C, ...) = neighbour - x,
    neighbour ids (N, C), squared distances (N, C))``; a class with no admissible entry gives a zero
    target, id -1 and distance inf.
    """
    n = x.shape[0]
    c, s = bank_ids.shape
    xf = x.reshape(n, -1).astype(jnp.float32)
    bf = bank.reshape(c, s, -1).astype(jnp.float32)
    valid = bank_ids >= 0
    centre = jnp.sum(jnp.where(valid[..., None], bf, 0.0), axis=(0, 1)) / jnp.maximum(jnp.sum(valid), 1)
    xc = xf - centre
    bc = bf - centre
    pad = (-s) % chunk_size
    bc = jnp.pad(bc, ((0, 0), (0, pad), (0, 0)))
    ids = jnp.pad(bank_ids, ((0, 0), (0, pad)), constant_values=-1)
    num_chunks = (s + pad) // chunk_size
    chunks = bc.reshape(c, num_chunks, chunk_size, -1).transpose(1, 0, 2, 3)
    id_chunks = ids.reshape(c, num_chunks, chunk_size).transpose(1, 0, 2)
    xx = jnp.sum(xc * xc, axis=-1)

    def body(carry, inp):
        best_d, best_pos = carry
        b, bid, j = inp
        dot = jnp.einsum("nd,ckd->nck", xc, b, precision=jax.lax.Precision.HIGHEST)
        d = xx[:, None, None] + jnp.sum(b * b, axis=-1)[None] - 2.0 * dot
        bad = (bid[None] < 0) | (bid[None] == x_ids[:, None, None])
        d = jnp.where(bad, jnp.inf, jnp.maximum(d, 0.0))
        pos = jnp.argmin(d, axis=-1)
        dmin = jnp.min(d, axis=-1)
        better = dmin < best_d
        return (jnp.where(better, dmin, best_d), jnp.where(better, j * chunk_size + pos, best_pos)), None

    init = (jnp.full((n, c), jnp.inf, jnp.float32), jnp.full((n, c), -1, jnp.int32))
    (best_d, best_pos), _ = jax.lax.scan(body, init, (chunks, id_chunks, jnp.arange(num_chunks)))
    found = best_pos >= 0
    flat = jnp.arange(c)[None, :] * s + jnp.clip(best_pos, 0, s - 1)
    neighbours = jnp.take(bf.reshape(c * s, -1), flat, axis=0)  # (N, C, D)
    targets = jnp.where(found[..., None], neighbours - xf[:, None], 0.0)
    nn_ids = jnp.where(found, jnp.take(bank_ids.reshape(-1), flat), -1)
    return targets.reshape((n, c) + x.shape[1:]), nn_ids, best_d


def nearest_neighbour_targets_dataset(images, labels, num_classes: int, sample_size: Optional[int] = None,
                                      seed: int = 0, chunk_size: int = 256, query_batch: int = 256,
                                      progress: Callable = lambda it: it, indices=None, bank=None):
    """NN targets for every image of a dataset (each image excluded from its own class's sample set),
    or for ``images[indices]`` only, computed in query batches of fixed size (one compilation).
    ``bank``: a ready :func:`nearest_neighbour_bank` of the whole dataset (default: built here).
    Returns ``(targets (M, C, ...) float32, neighbour ids (M, C) int32)`` as NumPy arrays."""
    images = np.asarray(images, np.float32)
    if bank is None:
        bank = nearest_neighbour_bank(images, labels, num_classes, sample_size, seed)
    bank, bank_ids = jnp.asarray(bank[0]), jnp.asarray(bank[1])
    query_ids = np.arange(len(images)) if indices is None else np.asarray(indices)
    n = len(query_ids)
    out = np.zeros((n, num_classes) + images.shape[1:], np.float32)
    out_ids = np.zeros((n, num_classes), np.int32)
    for start in progress(range(0, n, query_batch)):
        stop = min(start + query_batch, n)
        q = np.zeros((query_batch,) + images.shape[1:], np.float32)
        q[:stop - start] = images[query_ids[start:stop]]
        qid = np.full(query_batch, -2, np.int32)
        qid[:stop - start] = query_ids[start:stop]
        t, ids, _ = nearest_neighbour(jnp.asarray(q), jnp.asarray(qid), bank, bank_ids, chunk_size=chunk_size)
        out[start:stop] = np.asarray(t)[:stop - start]
        out_ids[start:stop] = np.asarray(ids)[:stop - start]
    return out, out_ids


# ----------------------------------------------------------------------------------------------------
# Score-based gradients
# ----------------------------------------------------------------------------------------------------


def score_based_targets(x, eps_cond: Callable, eps_uncond: Callable, alpha_bar: float, num_classes: int, *,
                        t=None, key=None, noise=None, num_samples: int = 1,
                        classes_per_call: Optional[int] = None):
    """Score-Based Gradients (SBG) from an epsilon-predicting diffusion model at one noise level.

    For each image and noise draw ``z ~ N(0, I)`` (shared by all classes of that image):
    ``x_t = sqrt(abar) x + sqrt(1 - abar) z`` and ::

        g(x, y) = -(eps_cond(x_t, t, y) - eps_uncond(x_t, t)) / sqrt(1 - abar)
                = grad_{x_t} log p_t(x_t | y) - grad_{x_t} log p_t(x_t) = grad_{x_t} log p_t(y | x_t)

    (Bayes' rule; the score of an epsilon model is ``-eps / sqrt(1 - abar)``), averaged over
    ``num_samples`` draws. The paper uses it as the target for the classifier's gradient at the clean
    x (assuming ``log p(y | x) ~ log p(y | x_t)`` at a moderate t).

    ``eps_cond(x_t (B, ...), t (B,), y (B,) int32) -> (B, ...)`` and ``eps_uncond(x_t, t) -> (B, ...)``;
    ``t`` is passed as a (B,) array filled with the given value (or None). ``x`` must be in the
    diffusion model's frame (usually [-1, 1]: pass ``2 x - 1`` for images in [0, 1]; the direction is
    then the same in [0, 1]). ``noise``: optional (N, ...) or (num_samples, N, ...) draws (else from
    ``key``). Classes are batched ``classes_per_call`` at a time (default all C: one call of batch N*C
    per draw, ``lax.map`` over class groups otherwise). Returns (N, C, ...) float32.
    """
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    if noise is None:
        if key is None:
            raise ValueError("score_based_targets needs a key or the noise")
        noise = jax.random.normal(key, (num_samples,) + x.shape, jnp.float32)
    else:
        noise = jnp.asarray(noise, jnp.float32)
        noise = noise[None] if noise.ndim == x.ndim else noise
    if noise.shape[1:] != x.shape:
        raise ValueError(f"noise of shape {noise.shape} does not fit images of shape {x.shape}")
    if not 0.0 < alpha_bar < 1.0:
        raise ValueError(f"alpha_bar must be in (0, 1), got {alpha_bar}")
    sab, s1 = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    group = num_classes if classes_per_call is None else max(1, min(int(classes_per_call), num_classes))
    num_groups = -(-num_classes // group)
    class_groups = (jnp.arange(num_groups * group, dtype=jnp.int32) % num_classes).reshape(num_groups, group)

    def tt(b):
        return None if t is None else jnp.full((b,), t)

    def one_draw(z):
        xt = sab * x + s1 * z
        eu = eps_uncond(xt, tt(n)).astype(jnp.float32)

        def per_group(cg):
            rows = jnp.broadcast_to(xt[None], (group,) + xt.shape).reshape((group * n,) + x.shape[1:])
            ec = eps_cond(rows, tt(group * n), jnp.repeat(cg, n)).astype(jnp.float32)
            return ec.reshape((group, n) + x.shape[1:])

        ec = jax.lax.map(per_group, class_groups).reshape((num_groups * group, n) + x.shape[1:])[:num_classes]
        return -(ec - eu[None]) / s1  # (C, N, ...)

    g = jnp.mean(jax.lax.map(one_draw, noise), axis=0)
    return jnp.moveaxis(g, 0, 1)


# ----------------------------------------------------------------------------------------------------
# Precomputed targets: arrays and files
# ----------------------------------------------------------------------------------------------------


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
            import torch  # pylint: disable=import-outside-toplevel

            return torch.load(path, map_location="cpu", weights_only=True).numpy(), None, None
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot read ({first})") from None
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
    from advalign_jax.data.tf_env import import_tf  # pylint: disable=import-outside-toplevel

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
    from advalign_jax.data import writer  # pylint: disable=import-outside-toplevel

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
    from advalign_jax.data.tf_env import import_tf  # pylint: disable=import-outside-toplevel

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
    from advalign_jax.data.tf_env import import_tf  # pylint: disable=import-outside-toplevel

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
        except tf.errors.OpError as err:
            raise DataError(f"{path}: record {i}: {err.message.splitlines()[0]}") from None
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
