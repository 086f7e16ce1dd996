"""The neural harmonizer's loss (Fel, Felipe, Linsley, Serre, NeurIPS 2022), as small pure functions.

Reference: the ``harmonization`` 0.0.9 package (PyPI; serre-lab/Harmonization),
``harmonization/training/loss.py`` and ``harmonization/training/pyramid.py``. The tests compare every
function, the full loss and its parameter gradient with that package's TensorFlow code.

For images x, labels y, human maps phi (N, H, W) and tokens t (N,):

1. ``g = d f_y(x) / d x`` from the **same** training-mode forward pass that gives the logits (the
   true-class logit, signed), then the mean over RGB: (N, H, W)  (:func:`saliency_from_vjp`; the
   reduction is an option, :func:`reduce_saliency`: ``'mean'`` is the reference's);
2. ``z+(h) = relu((h - mean_hw h) / (std_hw h + 1e-5))`` (:func:`standardize_cut`, population std; a
   constant map gives 0 with a finite derivative, :func:`safe_std`);
3. ``s = z+(g)``, ``h = z+(phi)``; ``h <- h / (max_hw h + 1e-6) * stop_gradient(max_hw s + 1e-6)``
   (:func:`rescale_to_saliency`);
4. Gaussian pyramid: 5x5 binomial kernel ``outer(b, b) / 256`` with ``b = [1, 4, 6, 4, 1]``, stride 2,
   TF "SAME" padding, level 0 = the input (:func:`pyramid`);
5. ``align = (1/L) sum_{i<L} mean_{n,h,w}[t_n (P_i(s) - P_i(h))^2]`` over the first L = 5 levels
   (:func:`pyramidal_mse`);
6. ``loss = CE(label smoothing 0.1, from logits) + 1e-5 * sum 0.5 w^2 + lambda * align``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.models.base import tf_same_pad

STD_EPS = 1e-5
MAX_EPS = 1e-6


def safe_std(h, axes, keepdims: bool = True):
    """Population standard deviation ``sqrt(mean((h - mean h)^2))`` whose derivative is finite where
    it is 0 (a constant map): there the square root's derivative (1 / (2 sqrt v) = inf) is replaced by
    0, as TensorFlow's ``SqrtGrad`` yields 0 for the zero cotangent a constant map receives (its
    standardised values are all 0, where ReLU passes nothing back). Elsewhere it is ``jnp.std``."""
    var = jnp.var(h, axis=axes, keepdims=keepdims)
    positive = var > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


def standardize_cut(h, axes=(1, 2), epsilon: float = STD_EPS):
    """``relu((h - mean) / (std + eps))`` over ``axes`` (population std, :func:`safe_std`), per map."""
    mean = jnp.mean(h, axis=axes, keepdims=True)
    std = safe_std(h, axes)
    return jax.nn.relu((h - mean) / (std + epsilon))


def rescale_to_saliency(h, s):
    """The human map rescaled to the saliency's peak: ``h / (max h + 1e-6) * sg(max s + 1e-6)``."""
    h_max = jnp.max(h, axis=(1, 2), keepdims=True) + MAX_EPS
    s_max = jax.lax.stop_gradient(jnp.max(s, axis=(1, 2), keepdims=True)) + MAX_EPS
    return h / h_max * s_max


def binomial_kernel() -> np.ndarray:
    """``outer([1,4,6,4,1], [1,4,6,4,1]) / 256``, shape (5, 5)."""
    b = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32)
    k = np.outer(b, b)
    return (k / k.sum()).astype(np.float32)


def downsample(x):
    """One pyramid step on (N, H, W): binomial blur, stride 2, TF "SAME" zero padding (no
    renormalisation at the edges)."""
    k = jnp.asarray(binomial_kernel(), x.dtype)[:, :, None, None]
    pads = (tf_same_pad(x.shape[1], 5, 2), tf_same_pad(x.shape[2], 5, 2))
    y = jax.lax.conv_general_dilated(x[..., None], k, window_strides=(2, 2), padding=pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return y[..., 0]


def pyramid(x, levels: int):
    """``[x, down(x), down(down(x)), ...]``: ``levels`` maps, level 0 being the input."""
    out = [x]
    for _ in range(levels - 1):
        out.append(downsample(out[-1]))
    return out


def pyramidal_mse(a, b, tokens, levels: int = 5):
    """``(1/L) sum_i mean_{n,h,w}[t_n (P_i(a) - P_i(b))^2]`` over the first ``levels`` levels."""
    pa, pb = pyramid(a, levels), pyramid(b, levels)
    t = tokens.astype(jnp.float32)[:, None, None]
    return sum(jnp.mean(jnp.square(u - v) * t) for u, v in zip(pa, pb)) / levels


SALIENCY_REDUCTIONS = ("mean", "absmax", "mean_abs")


def reduce_saliency(grad, variant: str = "mean"):
    """An input-gradient ``g`` (N, H, W, C) reduced over its channels:

    - ``'mean'``: ``mean_c g_c``, the signed mean (the reference ``harmonizer_loss``; the default, for
      reproduction). Gradients of opposite sign in different channels cancel, so a colour-contrast
      feature can carry a large ``|g|`` while its channel mean, the only thing the loss sees, is near 0
      (docs/demonstration.md measures this on the shortcut data);
    - ``'absmax'``: ``max_c |g_c|``, the evaluation saliency (Harmonization's ``saliency`` and the
      attack-side measures use it);
    - ``'mean_abs'``: ``mean_c |g_c|``, the absolute value before the channel mean (the reduction of
      Ross et al. 2017, "Right for the right reasons", and of SmoothGrad's magnitude maps): no
      cancellation, and every channel's gradient reaches the loss, not only the largest.
    """
    if variant == "mean":
        return jnp.mean(grad, axis=-1)
    if variant == "absmax":
        return jnp.max(jnp.abs(grad), axis=-1)
    if variant == "mean_abs":
        return jnp.mean(jnp.abs(grad), axis=-1)
    raise ValueError(f"saliency variant must be one of {', '.join(map(repr, SALIENCY_REDUCTIONS))}, got {variant!r}")


def saliency_from_vjp(vjp_fn, labels, num_classes: int, variant: str = "mean", dtype=jnp.float32):
    """The input-gradient of the true-class logit from a VJP of the forward pass, reduced over RGB
    (:func:`reduce_saliency`). ``dtype``: that of the logits (float64 for verification)."""
    (grad,) = vjp_fn(jax.nn.one_hot(labels, num_classes, dtype=dtype))
    return reduce_saliency(grad, variant)


def alignment_term(saliency, human_maps, tokens, levels: int = 5):
    """Steps 2-5: the harmonization term for a batch of saliency maps and human maps (N, H, W)."""
    s = standardize_cut(saliency)
    h = rescale_to_saliency(standardize_cut(human_maps), s)
    return pyramidal_mse(s, h, tokens, levels)
