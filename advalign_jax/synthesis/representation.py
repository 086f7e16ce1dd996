"""The representation a manipulation reads: a named layer of a model as ``images -> (N, D)``.

By default the penultimate features (``features``, the head's input in every architecture), read as the
``robustness`` library does (``model(x, with_latent=True, fake_relu=True)``): the last ReLU before them
is :func:`advalign_jax.models.base.fake_relu`, ReLU forward and identity backward, so a feature at 0
still has a gradient. Any layer the model exposes (:func:`advalign_jax.evaluation.sensitivity.units.layer_shapes`:
its stage outputs, ``features``, ``logits``) may be read instead, flattened per image.
"""

from __future__ import annotations

from typing import Callable

from advalign_jax.evaluation.sensitivity.units import layer_fn, layer_shapes
from advalign_jax.models.base import with_fake_relu


def representation(model, variables, layer: str = "features", fake_relu: bool = True) -> Callable:
    """``(variables, images) -> (N, D)``: ``layer`` of ``model`` (inference mode), flattened; with
    ``fake_relu`` the model's last ReLU is the identity backward (one line naming the architecture where
    it has none). ``variables`` here only give the layers' shapes."""
    shapes = layer_shapes(model, variables)
    read = layer_fn(with_fake_relu(model) if fake_relu else model, layer, shapes)
    return lambda variables, images: read(variables, images).reshape(images.shape[0], -1)
