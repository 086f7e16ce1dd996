"""Target gradients ``g(x, y_t)`` for PAG training (Ganz, Kawar, Elad, "Do Perceptually Aligned Gradients
Imply Robustness?", ICML 2023; the official code, royg27/PAG-ROB, reads them precomputed).

Sources, each returning targets of shape (N, C, *image_shape), one per class:

- **Heuristics** ``g(x, y_t) = r(y_t) - x`` for a class representative r (:func:`representative_targets`):
  **One Image** (:func:`one_image_representatives`: one fixed training image per class), **Class Mean**
  (:func:`class_mean_representatives`: the class's mean image, rescaled about a centre) and **Nearest
  Neighbour** (:func:`nearest_neighbour`: the L2-nearest image of class y_t other than x itself, in a
  sample set of that class; on the accelerator, in chunks of the sample set).
- **Score-based gradients** (:func:`score_based_targets`): the difference of a class-conditional and an
  unconditional score at a noise level t, from user-supplied epsilon-prediction functions.
- **Precomputed files**: read and written by :mod:`advalign_jax.data.target_files` (the official
  layout, each image followed by its C targets, (N, 1 + C, *image_shape); .npy/.npz/.pt or TFRecords).

Frames: the project's images are NHWC in [0, 1]; the official code's are in [-1, 1]. The targets are
directions compared by a cosine, and ``x_[0,1] = (x_[-1,1] + 1) / 2`` is an increasing affine map, so a
target gradient keeps its direction in either frame: convert the images
(:func:`advalign_jax.data.target_files.rescale_images`), never the targets. (A heuristic ``r - x`` is
the same direction in both frames; CM's rescaling is done about ``center``, see
:func:`class_mean_representatives`.)
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.errors import DataError


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
