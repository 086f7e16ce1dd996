"""ClickMe preprocessing, exactly as the reference loader does it (TensorFlow ops, run in tf.data).

Reference: the ``harmonization`` 0.0.9 package (serre-lab/Harmonization), ``harmonization/common/blur.py``
and ``harmonization/common/clickme_dataset.py::parse_clickme_prototype``.

- image: float32, resized to 224x224 by bilinear interpolation with half-pixel centres and no
  antialiasing (TF2 ``tf.image.resize``), values unchanged (0..255);
- heatmap: resized to 64x64 (bilinear), blurred by a 10x10 Gaussian of sigma 10 with TF "SAME"
  padding, resized to 224x224 (bilinear); not normalised. The adversarial-alignment study instead
  uses the map as stored (:func:`heatmap_as_stored`; serre-lab/Adversarial-Alignment,
  ``adversarial_alignment/scripts/dataset.py``).

The training-time variant of the lab's older code adds per-map min-max normalisation and the same
random-resized crop and horizontal flip applied to image and map (:func:`random_resized_crop_flip`).
"""

from __future__ import annotations

import numpy as np

from advalign_jax.data.tf_env import import_tf

BLUR_KERNEL_SIZE = 10
BLUR_SIGMA = 10.0
IMAGE_SIZE = 224
HEATMAP_BLUR_SIZE = 64


def gaussian_kernel(size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """The reference's (slightly off-centre) Gaussian kernel, shape (size, size), float32, sum 1.

    ``k[r, c] ∝ exp(-(x_c**2 + y_r**2) / (2 sigma**2))`` on the integer grid with columns
    ``x = -(size-1)//2, ..., (size-1)//2`` and rows ``y = (size-1)//2, ..., -(size-1)//2`` (descending),
    with Python's floor division: for size 10, x in [-5..4] and y in [4..-5], so the peak is at
    row 4, column 5. Normalised to sum 1 (the 1/(2 pi sigma^2) factor cancels).
    """
    half = (size - 1) // 2
    x = np.arange(-(size - 1) // 2, half + 1, dtype=np.float64)
    y = np.arange(half, -(size - 1) // 2 - 1, -1, dtype=np.float64)
    xs, ys = np.meshgrid(x, y)
    kernel = np.exp(-(xs ** 2 + ys ** 2) / (2.0 * sigma ** 2))
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(heatmap, kernel: np.ndarray):
    """2-D cross-correlation of a (H, W, 1) map with ``kernel``, TF "SAME" padding, stride 1.

    TF SAME pads ``(k - 1) // 2`` before and ``k // 2`` after (4 and 5 for k = 10), with zeros.
    """
    tf = import_tf()
    kernel = tf.constant(np.asarray(kernel, np.float32)[:, :, None, None])
    return tf.nn.conv2d(heatmap[None], kernel, strides=1, padding="SAME")[0]


def resize(x, size: int, method: str = "bilinear"):
    """``tf.image.resize`` to (size, size): half-pixel centres, no antialiasing (TF2 semantics)."""
    tf = import_tf()
    return tf.image.resize(x, (size, size), method=method, antialias=False)


def preprocess_image(image, size: int = IMAGE_SIZE):
    """Reference image preprocessing: float32 (H, W, 3) -> (size, size, 3), bilinear, 0..255 kept."""
    tf = import_tf()
    return resize(tf.cast(image, tf.float32), size)


def preprocess_heatmap(heatmap, size: int = IMAGE_SIZE, blur_size: int = HEATMAP_BLUR_SIZE,
                       kernel: np.ndarray | None = None, small_method: str = "bilinear"):
    """Reference heatmap pipeline: (H, W, 1) -> resize to blur_size -> Gaussian blur -> resize to size.

    ``small_method`` is the interpolation of the first resize: ``'bilinear'`` in the released loader,
    ``'bicubic'`` in the lab's older training code.
    """
    tf = import_tf()
    kernel = gaussian_kernel() if kernel is None else kernel
    heatmap = resize(tf.cast(heatmap, tf.float32), blur_size, method=small_method)
    heatmap = gaussian_blur(heatmap, kernel)
    return resize(heatmap, size)


def heatmap_as_stored(heatmap, size: int = IMAGE_SIZE):
    """The map as the record stores it (the adversarial-alignment study's parser: decode and reshape,
    no resize, no blur), float32 (H, W, 1). Only a map whose size differs from ``size`` is resized
    (bilinear, as the image), so that it lines up with the image."""
    tf = import_tf()
    heatmap = tf.cast(heatmap, tf.float32)
    same = tf.reduce_all(tf.equal(tf.shape(heatmap)[:2], [size, size]))
    return tf.cond(same, lambda: tf.ensure_shape(heatmap, [size, size, 1]),
                   lambda: tf.ensure_shape(resize(heatmap, size), [size, size, 1]))


def minmax_normalise(heatmap, epsilon: float = 1e-5):
    """Per-map min-max normalisation of the older training code: ``h -= min(h); h /= max(h) + eps``.

    An all-zero map stays all zero (no NaN).
    """
    tf = import_tf()
    heatmap = heatmap - tf.reduce_min(heatmap)
    return heatmap / (tf.reduce_max(heatmap) + epsilon)


def random_resized_crop_flip(image, heatmap, seed, size: int = IMAGE_SIZE,
                             area_range=(0.08, 1.0), aspect_range=(3.0 / 4.0, 4.0 / 3.0),
                             flip: bool = True):
    """One random-resized crop and horizontal flip, applied identically to image and map.

    The crop is Inception-style: a box covering a fraction of the area drawn from ``area_range`` and
    an aspect ratio from ``aspect_range`` (``tf.image.stateless_sample_distorted_bounding_box``, 10
    attempts, the whole image if none fits), resized to (size, size) bilinearly; then a flip with
    probability 1/2. ``seed`` is a stateless seed (shape (2,) int) so the result depends only on it.
    """
    tf = import_tf()
    stacked = tf.concat([image, heatmap], axis=-1)  # (H, W, 4): one crop for both
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(stacked), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=aspect_range, area_range=area_range,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    stacked = tf.slice(stacked, begin, crop_size)
    stacked = resize(stacked, size)
    if flip:
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        do_flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        stacked = tf.cond(do_flip, lambda: tf.image.flip_left_right(stacked), lambda: stacked)
    return stacked[..., :3], stacked[..., 3:]
