"""The PAG training augmentation, differentiable in the images: pad-and-crop, then a horizontal flip.

The official PAG code (royg27/PAG-ROB, ``TRAIN_CIFAR10.py``) draws one random crop (padding 4) and one
flip per call of ``aug(...)`` (torchvision's ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip()`` applied to a 4-D tensor transform the whole batch alike), applies a fresh
draw to the replicated batch, and differentiates w.r.t. the **un-augmented** replicated images, i.e.
through the crop and the flip; the gradient thus lives in the frame of the stored target (and is zero
on the pixels cropped away). :func:`crop_flip` is that augmentation as a linear function of the
images; :func:`make_crop_flip` gives the ``augment(key, images)`` that
:func:`advalign_jax.losses.pag.pag_loss` applies inside the differentiated function.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def crop_flip(x, offsets, flips, padding: int = 4, fill: float = 0.0):
    """Pad-and-crop then horizontal flip of NHWC images, linear in ``x`` (so gradients flow back to the
    un-augmented frame).

    ``x_pad = pad(x, padding, constant fill)``; ``out = x_pad[i:i+H, j:j+W]`` with ``(i, j) = offsets``
    (per image (N, 2), or (2,) for the whole batch); then ``out[:, :, ::-1]`` where ``flips`` (per image
    (N,) or a scalar). torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``. The
    official images are in [-1, 1] and pad with 0, i.e. ``fill=0.5`` for images in [0, 1].
    """
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=fill)
    offsets = jnp.broadcast_to(jnp.asarray(offsets, jnp.int32), (n, 2))
    flips = jnp.broadcast_to(jnp.asarray(flips, bool), (n,))

    def one(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], jnp.zeros((), off.dtype)), (h, w, c))

    out = jax.vmap(one)(xp, offsets)
    return jnp.where(flips[:, None, None, None], out[:, :, ::-1], out)


def sample_crop_flip(key, num_images: int, padding: int = 4, per_example: bool = True):
    """Random ``(offsets, flips)`` for :func:`crop_flip`: offsets uniform in ``0..2*padding``, flip with
    probability 1/2; per image, or (``per_example=False``) one draw for the whole batch as torchvision
    does on a 4-D tensor (the official code)."""
    k1, k2 = jax.random.split(key)
    m = num_images if per_example else 1
    offsets = jax.random.randint(k1, (m, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(k2, 0.5, (m,))
    return jnp.broadcast_to(offsets, (num_images, 2)), jnp.broadcast_to(flips, (num_images,))


def make_crop_flip(padding: int = 4, fill: float = 0.0, per_example: bool = True) -> Callable:
    """``augment(key, x)``: :func:`crop_flip` with a fresh random draw, for :func:`pag_loss`."""
    def augment(key, x):
        offsets, flips = sample_crop_flip(key, x.shape[0], padding, per_example)
        return crop_flip(x, offsets, flips, padding, fill)

    return augment
