"""Optimizers and learning-rate schedules of the training recipes.

- ``warmup_step``: linear warm-up from 0 over ``warmup_epochs``, then the base rate multiplied by
  ``factors[i]`` from epoch ``boundaries[i]`` on (the harmonization recipe: warm-up 5 epochs, x0.1 at
  30, x0.01 at 60, x0.001 at 80; PAG: no warm-up, x0.1 at 50, x0.01 at 75, x0.001 at 100; the official
  PAG code's steps, :func:`official_pag_boundaries`, fall one epoch earlier). Epochs count from 0:
  epoch k is steps ``[k * steps_per_epoch, (k + 1) * steps_per_epoch)``, and a boundary b applies
  from step ``round(b * steps_per_epoch)`` on;
- ``cosine``: linear warm-up then cosine decay to ``end_factor`` of the base rate;
- ``constant``.

Optimizers: ``sgd`` (momentum, optionally Nesterov; the recipes), ``adamw`` and ``adam``. Decoupled
weight decay (``optimizer.weight_decay``) is applied through :func:`decay_mask`; the harmonization
recipe instead puts an L2 term in the loss (see ``objectives``).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import optax

from advalign_jax.errors import ConfigError


def decay_mask(params, exclude: Sequence[str]):
    """A tree of bools: True for parameters whose path contains none of the ``exclude`` substrings."""
    def keep(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return not any(s in name for s in exclude)
    return jax.tree_util.tree_map_with_path(keep, params)


def schedule(cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule of the ``schedule`` config block (module docstring)."""
    base = float(cfg.base_lr)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if base <= 0:
        raise ConfigError(f"schedule.base_lr must be positive, got {base}")
    if cfg.name == "constant":
        main = optax.constant_schedule(base)
    elif cfg.name == "warmup_step":
        if len(cfg.boundaries) != len(cfg.factors):
            raise ConfigError("schedule.boundaries and schedule.factors must have the same length")
        steps = [int(round(b * steps_per_epoch)) - warmup for b in cfg.boundaries]
        factors = [float(f) for f in cfg.factors]
        # piecewise_constant_schedule multiplies successive scales; turn cumulative factors into ratios.
        scales, prev = {}, 1.0
        for s, f in zip(steps, factors):
            scales[max(s, 0)] = f / prev
            prev = f
        main = optax.piecewise_constant_schedule(base, scales)
    elif cfg.name == "cosine":
        main = optax.cosine_decay_schedule(base, max(total_steps - warmup, 1), alpha=float(cfg.end_factor))
    else:
        raise ConfigError(f"schedule.name must be warmup_step, cosine or constant, got {cfg.name!r}")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def official_pag_boundaries(epochs: int = 100) -> tuple:
    """The epochs (counted from 0) at which the official PAG code steps its learning rate.

    ``royg27/PAG-ROB`` ``TRAIN_CIFAR10.py``, ``adjust_learning_rate(optimizer, epoch)``, called before
    each epoch with the 1-indexed ``epoch = 1..E``: the rate is ``lr`` times 0.1 if ``epoch >= 0.5 E``,
    0.01 if ``epoch >= 0.75 E``, 0.001 if ``epoch >= E``. Epoch e (1-indexed) is epoch ``e - 1`` here,
    so the steps fall at ``ceil(0.5 E) - 1``, ``ceil(0.75 E) - 1`` and ``E - 1``: (49, 74, 99) for
    E = 100, i.e. 49 epochs at 0.01, 25 at 1e-3, 25 at 1e-4 and the last at 1e-5 (with the factors
    (0.1, 0.01, 0.001))."""
    e = int(epochs)
    return (float(math.ceil(0.5 * e) - 1), float(math.ceil(0.75 * e) - 1), float(e - 1))


def epoch_learning_rates(lr: optax.Schedule, steps_per_epoch: int, epochs: int) -> list:
    """``[(rate at the first step of epoch k, rate at its last step) for k in 0..epochs-1]``."""
    return [(float(lr(k * steps_per_epoch)), float(lr((k + 1) * steps_per_epoch - 1))) for k in range(int(epochs))]


def optimizer(cfg, lr: optax.Schedule, params) -> optax.GradientTransformation:
    """The optimizer of the ``optimizer`` config block."""
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
    mask = decay_mask(params, tuple(cfg.decay_exclude))
    if cfg.name == "sgd":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(float(cfg.weight_decay), mask))
        parts.append(optax.sgd(lr, momentum=float(cfg.momentum) or None, nesterov=bool(cfg.nesterov)))
    elif cfg.name == "adamw":
        parts.append(optax.adamw(lr, b1=float(cfg.b1), b2=float(cfg.b2), weight_decay=float(cfg.weight_decay),
                                 mask=mask))
    elif cfg.name == "adam":
        parts.append(optax.adam(lr, b1=float(cfg.b1), b2=float(cfg.b2)))
    else:
        raise ConfigError(f"optimizer.name must be sgd, adamw or adam, got {cfg.name!r}")
    return optax.chain(*parts)
