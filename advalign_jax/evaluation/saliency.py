"""Saliency methods for the human-alignment score, as pure functions of ``(logits_fn, x, labels)``.

- :func:`gradient`: ``|d f_y(x) / d x|``, max over channels (the harmonization package's evaluation
  saliency; training uses the signed channel mean instead);
- :func:`smoothgrad`: the mean of that gradient saliency over ``n`` copies of the input with Gaussian
  noise of standard deviation ``sigma * (max(x) - min(x))`` per image (Smilkov et al. 2017).

Each returns (N, H, W). :data:`METHODS` maps names to them (``evaluate-clickme --config.saliency=...``);
adding a method is adding a function there.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _true_class_grad(logits_fn: Callable, x, labels):
    logits, vjp = jax.vjp(logits_fn, x)
    (g,) = vjp(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype))
    return g


def gradient(logits_fn: Callable, x, labels, key=None, **_):
    """``max_c |d f_y / d x|`` per pixel."""
    return jnp.max(jnp.abs(_true_class_grad(logits_fn, x, labels)), axis=-1)


def smoothgrad(logits_fn: Callable, x, labels, key=None, n: int = 16, sigma: float = 0.15, **_):
    """Mean gradient saliency over ``n`` noisy copies (noise std ``sigma`` x each image's value range)."""
    if key is None:
        key = jax.random.PRNGKey(0)
    span = jnp.max(x, axis=(1, 2, 3), keepdims=True) - jnp.min(x, axis=(1, 2, 3), keepdims=True)

    def one(k):
        noisy = x + sigma * span * jax.random.normal(k, x.shape, x.dtype)
        return gradient(logits_fn, noisy, labels)

    return jnp.mean(jax.lax.map(one, jax.random.split(key, n)), axis=0)


METHODS = {"gradient": gradient, "smoothgrad": smoothgrad}
