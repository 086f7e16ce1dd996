"""The units whose sensitivity is measured: a named layer of a model, its units, or neural sites read
out from it.

**Layers** are the activations an architecture sows (``model.intermediates``: the stage outputs of the
convolutional families, the blocks of the transformers) plus ``features`` (the penultimate features,
the head's input, in every architecture of the zoo) and ``logits``. :func:`layer_shapes` lists them.

**Units** of a layer (``reduce``):

- ``'mean'``: a channel's spatial mean (a map (H, W, C) gives C units; a token sequence (T, D) the
  mean over tokens, D units): the unit the neural-sensitivity study's "model units" stand for when a
  layer is read like a population of neurons with large receptive fields;
- ``'position'``: one channel at one position (H * W * C units, index ``(h * W + w) * C + c``): a unit
  of the convolutional map itself;
- a vector layer (``features``, ``logits``) gives its D entries either way.

All units, a seeded sample of ``count`` of them (``numpy.random.default_rng(seed).choice`` without
replacement, sorted), or explicit ``indices``.

**Sites**: with a readout (:mod:`advalign_jax.evaluation.sensitivity.readout`) fitted from a layer's
units to recordings, the units are the readout's sites: ``r_s(x) = units(x) . w_s + b_s``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.errors import ConfigError

REDUCES = ("mean", "position")


def layer_shapes(model, variables) -> dict:
    """``{layer: per-image shape}`` of every layer the model exposes (no computation: shapes only)."""
    order = []

    def all_layers(images):
        out = model.intermediates(variables, images)
        out["logits"] = model.apply(variables, images)
        order.extend(out)  # the network's order (the pytree of the result sorts its keys)
        return out

    shapes = jax.eval_shape(all_layers, model.dummy_input(1))
    return {k: tuple(shapes[k].shape[1:]) for k in order}


def describe_layers(shapes: dict) -> str:
    return ", ".join(f"{k} ({'x'.join(map(str, s))})" for k, s in shapes.items())


def layer_fn(model, layer: str, shapes: dict) -> Callable:
    """``(variables, images) -> (N, ...)``: the layer's activation (inference mode)."""
    if layer not in shapes:
        raise ConfigError(f"layer={layer!r}: model {model.name} has no such layer; its layers: "
                          f"{describe_layers(shapes)}")
    if layer == "logits":
        return lambda variables, images: model.apply(variables, images)
    return lambda variables, images: model.intermediates(variables, images)[layer]


def unit_count(shape: Sequence[int], reduce: str) -> int:
    """How many units a layer of per-image ``shape`` has under ``reduce``."""
    if reduce not in REDUCES:
        raise ConfigError(f"units.reduce must be one of {', '.join(REDUCES)}, got {reduce!r}")
    return int(np.prod(shape)) if (reduce == "position" or len(shape) == 1) else int(shape[-1])


def flatten_units(activation, reduce: str):
    """(N, ...) activation -> (N, U) units (the module docstring)."""
    if activation.ndim == 2 or reduce == "position":
        return activation.reshape(activation.shape[0], -1)
    return jnp.mean(activation, axis=tuple(range(1, activation.ndim - 1)))


def select_units(total: int, count: int = 0, seed: int = 0, indices: Sequence[int] = (),
                 what: str = "units") -> np.ndarray:
    """The measured units among ``total``: ``indices`` if given, else a seeded sample of ``count``
    (0: all)."""
    if len(indices):
        idx = np.asarray([int(i) for i in indices])
        bad = idx[(idx < 0) | (idx >= total)]
        if bad.size:
            raise ConfigError(f"{what}.indices: unit {int(bad[0])} is out of range (the layer has {total} "
                              f"units, 0..{total - 1})")
        if len(set(idx.tolist())) != len(idx):
            raise ConfigError(f"{what}.indices lists a unit twice")
        return idx
    if count < 0:
        raise ConfigError(f"{what}.count must be >= 0 (0: all units), got {count}")
    if count == 0 or count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


@dataclasses.dataclass(frozen=True)
class Units:
    """The measured units of one model: ``response(variables, images) -> (N, len(names))``."""

    response: Callable
    names: tuple
    layer: str
    reduce: str
    readout: Optional[object] = None  # a fitted readout (sites), or None (the layer's own units)


def make_units(model, variables, layer: str, reduce: str = "mean", count: int = 0, seed: int = 0,
               indices: Sequence[int] = (), readout=None, site_names: Sequence[str] = ()) -> Units:
    """The response function of the configured units (the module docstring). ``readout``: a fitted
    readout from this layer's units (all of them, under ``reduce``) to sites; the units are then its
    sites (``count``/``indices`` select among them)."""
    shapes = layer_shapes(model, variables)
    act = layer_fn(model, layer, shapes)
    total = unit_count(shapes[layer], reduce)
    if readout is None:
        chosen = select_units(total, count, seed, indices)
        take = jnp.asarray(chosen)
        names = tuple(str(int(i)) for i in chosen)

        def response(v, images):
            return jnp.take(flatten_units(act(v, images), reduce), take, axis=1)

        return Units(response, names, layer, reduce)
    if readout.weights.shape[0] != total:
        raise ConfigError(f"the readout maps {readout.weights.shape[0]} units but layer {layer!r} has {total} "
                          f"under reduce={reduce!r}")
    sites = readout.weights.shape[1]
    chosen = select_units(sites, count, seed, indices, what="units")
    chosen = np.asarray([i for i in chosen if bool(readout.valid[i])], int)
    take = jnp.asarray(chosen)
    all_names = tuple(site_names) or tuple(f"site{i}" for i in range(sites))
    names = tuple(all_names[i] for i in chosen)

    def site_response(v, images):
        return jnp.take(readout.apply(flatten_units(act(v, images), reduce)), take, axis=1)

    return Units(site_response, names, layer, reduce, readout)


def layer_units(model, variables, layer: str, reduce: str, images, batch_size: int = 256) -> np.ndarray:
    """(N, U) every unit of ``layer`` on ``images`` (the readout's features), in batches."""
    shapes = layer_shapes(model, variables)
    act = layer_fn(model, layer, shapes)
    fn = jax.jit(lambda v, x: flatten_units(act(v, x), reduce))
    return np.concatenate([np.asarray(fn(variables, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])
