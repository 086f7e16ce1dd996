"""The per-example losses APGD ascends, and APGD-T's target classes.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020), which introduces the DLR loss, as fra31/auto-attack computes
them (``autoattack/autopgd_base.py``: ``APGDAttack.dlr_loss``, ``APGDAttack_targeted.dlr_loss_targeted``).
``pi`` sorts the logits ``z`` in decreasing order:

- ``ce``: ``-log softmax(z)_y`` (APGD-CE);
- ``dlr``: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` (at least 3 classes);
- ``dlr-targeted``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` towards target ``t`` (APGD-T,
  at least 4 classes), whose targets are the clean point's classes ranked 2nd, 3rd, ... by logit.

The losses are computed in float32 at least (float64 inputs stay float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("ce", "dlr", "dlr-targeted")
DLR_EPS = 1e-12


def _float(z):
    return z.astype(jnp.promote_types(z.dtype, jnp.float32))


def _take(z, idx):
    return jnp.take_along_axis(z, jnp.asarray(idx)[:, None], axis=1)[:, 0]


def ce_loss(logits, y):
    """Per-example cross-entropy ``-log softmax(z)_y``, shape (N,)."""
    z = _float(logits)
    return -_take(jax.nn.log_softmax(z, axis=1), y)


def dlr_loss(logits, y):
    """Untargeted DLR: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``, shape (N,).

    ``z_pi1 >= z_pi2 >= ...`` are the sorted logits (needs at least 3 classes)."""
    z = _float(logits)
    if z.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, the model has {z.shape[1]}")
    s = jnp.sort(z, axis=1)
    others = jnp.where(jax.nn.one_hot(y, z.shape[1], dtype=bool), -jnp.inf, z)
    return -(_take(z, y) - jnp.max(others, axis=1)) / (s[:, -1] - s[:, -3] + DLR_EPS)


def targeted_dlr_loss(logits, y, target):
    """Targeted DLR (APGD-T): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``, shape (N,)
    (needs at least 4 classes)."""
    z = _float(logits)
    if z.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, the model has {z.shape[1]}")
    s = jnp.sort(z, axis=1)
    return -(_take(z, y) - _take(z, target)) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]) + DLR_EPS)


def apgd_loss(logits, y, loss: str, target=None):
    """The per-example loss of ``loss`` (``ce``, ``dlr``, ``dlr-targeted``)."""
    if loss == "ce":
        return ce_loss(logits, y)
    if loss == "dlr":
        return dlr_loss(logits, y)
    return targeted_dlr_loss(logits, y, target)


def top_targets(logits, n: int):
    """(N, n) int: the classes ranked 2nd .. (n+1)-th by logit (AutoAttack's APGD-T targets,
    ``sort(z)[-k]`` for ``k = 2 .. n + 1``)."""
    k = logits.shape[1]
    if n > k - 1:
        raise ValueError(f"APGD-T with n_target_classes={n} needs at least {n + 1} classes, the model has {k}")
    order = jnp.argsort(-_float(logits), axis=1)
    return order[:, 1:n + 1]

