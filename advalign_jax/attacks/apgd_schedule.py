"""APGD's step-size schedule: the checkpoints and the rule that halves the step there.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020), Algorithm 1, as fra31/auto-attack's ``autoattack/autopgd_base.py``
runs it (``APGDAttack.attack_single_run``, ``check_oscillation``; where the code and the paper differ, the
code is followed: :mod:`advalign_jax.attacks.apgd` names the differences):

- checkpoints (:func:`checkpoints`, the code's integer form): ``w_0 = 0``, ``w_1 = max(int(0.22 N), 1)``,
  then windows shrinking by ``max(int(0.03 N), 1)`` down to ``max(int(0.06 N), 1)``, while ``w_j <= N``;
  the paper's ``w_j = ceil(p_j N)`` with ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
  0.06)`` is :func:`paper_checkpoints`;
- at ``w_j`` the step is halved and the iterate restarted from the best point when condition 1,
  ``#{i in [w_{j-1}, w_j): f(x(i+1)) > f(x(i))} <= rho (w_j - w_{j-1})``, or condition 2, the step was
  not halved at ``w_{j-1}`` and the best loss did not increase since, holds (:func:`controller_update`,
  a pure function of the loss sequence).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def checkpoints(n_iter: int) -> tuple:
    """``(w_0 = 0, w_1, w_2, ...)``: the iteration counts after which the step size is checked, as
    the original code computes them: first window ``max(int(0.22 N), 1)``, each next window shorter
    by ``max(int(0.03 N), 1)`` but at least ``max(int(0.06 N), 1)``, while ``w_j <= N``.

    N = 100: (0, 22, 41, 57, 70, 80, 87, 93, 99).
    """
    first = max(int(0.22 * n_iter), 1)
    shortest = max(int(0.06 * n_iter), 1)
    shrink = max(int(0.03 * n_iter), 1)
    out, window = [0], first
    while out[-1] + window <= n_iter:
        out.append(out[-1] + window)
        window = max(window - shrink, shortest)
    return tuple(out)


def paper_checkpoints(n_iter: int) -> tuple:
    """The paper's schedule in exact arithmetic: ``w_j = ceil(p_j N)`` for ``p_j <= 1`` with
    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (repeats dropped).
    For reference and comparison; :func:`checkpoints` is what runs."""
    p_prev, p = Fraction(0), Fraction(22, 100)
    out = [0]
    while p <= 1:
        w = math.ceil(p * n_iter)
        if w > out[-1]:
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - Fraction(3, 100), Fraction(6, 100))
    return tuple(out)


def _check_arrays(n_iter: int, rho: float):
    """Per iteration i (which computes x(i+1)): is (i+1) a checkpoint, and the condition-1 threshold
    ``rho * (w_j - w_{j-1})`` there (float32, as the code's tensor comparison)."""
    w = checkpoints(n_iter)
    is_check = np.zeros(n_iter, bool)
    threshold = np.zeros(n_iter, np.float32)
    for lo, hi in zip(w[:-1], w[1:]):
        is_check[hi - 1] = True
        threshold[hi - 1] = np.float32(rho * (hi - lo))
    return is_check, threshold



class Controller(NamedTuple):
    """Per-example state of the checkpoint logic."""

    increases: jax.Array  # #{f(x(i+1)) > f(x(i))} since the last checkpoint
    last_loss: jax.Array  # f of the latest iterate (0 before the first: the code's zero history)
    best_loss: jax.Array  # f(x_max)
    best_at_check: jax.Array  # f(x_max) at the last checkpoint (f(x(0)) before the first)
    halved_at_check: jax.Array  # the step was halved at the last checkpoint (True before the first)


def controller_init(loss0) -> Controller:
    """The state after evaluating the start x(0) with loss ``loss0`` (N,)."""
    return Controller(jnp.zeros(loss0.shape, jnp.int32), jnp.zeros_like(loss0), loss0, loss0,
                      jnp.ones(loss0.shape, bool))


def controller_update(state: Controller, loss, is_check, threshold, count_increase=True):
    """One iteration: ``loss`` = f(x(i+1)). Returns ``(state, halve, improved)``: ``improved``: x(i+1)
    is the new x_max (strictly higher loss); ``halve``: halve the step and restart from x_max (only
    at a checkpoint; condition 1 or 2 of the module docstring)."""
    increased = jnp.logical_and(loss > state.last_loss, count_increase)
    increases = state.increases + increased.astype(jnp.int32)
    improved = loss > state.best_loss
    best = jnp.where(improved, loss, state.best_loss)
    cond1 = increases.astype(jnp.float32) <= threshold
    cond2 = jnp.logical_and(jnp.logical_not(state.halved_at_check), state.best_at_check >= best)
    halve = jnp.logical_and(is_check, jnp.logical_or(cond1, cond2))
    new = Controller(
        increases=jnp.where(is_check, 0, increases),
        last_loss=loss,
        best_loss=best,
        best_at_check=jnp.where(is_check, best, state.best_at_check),
        halved_at_check=jnp.where(is_check, halve, state.halved_at_check),
    )
    return new, halve, improved


def halving_decisions(losses, loss0, n_iter: int, rho: float = 0.75):
    """The controller run over a given loss sequence: ``losses`` (n_iter, N) = f(x(1)) .. f(x(N)),
    ``loss0`` (N,) = f(x(0)). Returns (n_iter, N) bool: the step is halved after iteration i.
    (In a real run the losses after a halving depend on it; this isolates the decision rule.)"""
    is_check, threshold = _check_arrays(n_iter, rho)

    def body(state, xs):
        loss, c, t, i = xs
        state, halve, _ = controller_update(state, loss, c, t, count_increase=(i > 0) | (n_iter > 1))
        return state, halve

    losses = jnp.asarray(losses)
    _, halves = jax.lax.scan(body, controller_init(jnp.asarray(loss0, losses.dtype)),
                             (losses, jnp.asarray(is_check), jnp.asarray(threshold), jnp.arange(n_iter)))
    return halves

