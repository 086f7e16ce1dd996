"""An independent PyTorch (float64) version of the unit-sensitivity search, written from its specification
(Guo et al. 2022, section 3, as the module docstring of ``advalign_jax.evaluation.sensitivity.optimize``
states it), not from the JAX code.

The quantity: for a unit with response ``r`` at an image ``x``,
``s(x, eps) = max over ||delta||_2 <= eps with x + delta in [lo, hi] of |r(x + delta) - r(x)|``.

The procedure:

- **both signs**: ``f+(delta) = r(x + delta) - r(x)`` and ``f-(delta) = r(x) - r(x + delta)`` are
  maximised by separate runs and the larger result kept;
- **restarts**: ``R`` runs per sign from given starting perturbations; a restart's start is shared by
  both signs. Runs are laid out sign-major: runs ``0 .. R-1`` maximise ``f+``, runs ``R .. 2R-1``
  maximise ``f-``, and run ``k`` and run ``k + R`` start from the same perturbation;
- **two phases, 2 eps then eps**: phase 1 searches the ball of radius ``wide * eps`` (``wide = 1``: no
  phase 1); phase 2 searches the ball of radius ``eps``, starting from phase 1's best point;
- each phase first makes its starting point valid (projected onto the phase's ball, then clipped into
  the box), evaluates it (value and gradient), then tries ``steps`` candidates. A candidate is made
  from the phase's **best point so far** ``d*`` and **the gradient at that point** ``g*``:
  ``d = clip(P_rho(d* + alpha * g* / ||g*||_2))``, the projection onto the ball first, then the clip of
  ``x + d`` into ``[lo, hi]``; a zero gradient gives a zero step;
- **annealed step**: ``alpha`` starts at ``eps`` in each phase (in both phases, the wide one included)
  and is multiplied by ``decay`` after every candidate that is not strictly better than ``d*``; a
  strictly better candidate becomes ``d*`` (with its gradient) and ``alpha`` is kept;
- **the estimate**: a run's result is the best value of its phase 2 (a point of the eps-ball and of
  the box); an item's is ``max(0, best over its 2R runs)`` (``delta = 0`` is feasible).

Perturbations are handled as flat ``(runs, D)`` vectors; the objective and the response see them in
the images' own shape. Everything is float64 and runs on the CPU.
"""

import numpy as np
import torch

DTYPE = torch.float64


def _as64(a):
    if isinstance(a, torch.Tensor):
        return a.to(DTYPE)
    return torch.from_numpy(np.array(a, dtype=np.float64))  # a copy: JAX's arrays are read-only


def _ball(d, rho):
    """The Euclidean projection of each row of ``d`` (N, D) onto the ball of radius ``rho`` (N,)."""
    n = torch.linalg.vector_norm(d, dim=1)
    outside = n > rho
    scale = torch.where(outside, rho / torch.where(outside, n, torch.ones_like(n)), torch.ones_like(n))
    return d * scale[:, None]


def _direction(g):
    """``g / ||g||`` per row, a zero row where ``g`` is zero."""
    n = torch.linalg.vector_norm(g, dim=1)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    return torch.where((n > 0)[:, None], g / safe[:, None], torch.zeros_like(g))


def maximise(objective, x, eps, init, steps, wide=2.0, decay=0.9, clip=(0.0, 1.0), history=None):
    """Maximise ``objective`` for each run independently (the module docstring).

    ``objective(images) -> (N,)``: one value per run (runs must not interact); ``x``: (N, ...) the runs'
    clean images; ``eps``: (N,) radii or a number; ``init``: (N, ...) starting perturbations; ``steps``:
    candidates per phase; ``wide``: phase 1's radius in eps (1: phase 2 only); ``decay``: the step's
    factor after a candidate without progress; ``clip``: ``(lo, hi)`` or None.
    ``history``: a list to which each iteration appends ``(phase, alpha_before, accepted)`` (tensors
    of (N,)), for checks of the schedule. Returns ``(values (N,), deltas (N, ...))``: phase 2's best.
    """
    x = _as64(x)
    n = x.shape[0]
    shape = x.shape
    xf = x.reshape(n, -1)
    eps = _as64(eps).expand(n).clone() if _as64(eps).dim() == 0 else _as64(eps).reshape(n)

    def valid(d):
        if clip is None:
            return d
        return torch.clamp(xf + d, clip[0], clip[1]) - xf

    def value_and_gradient(d):
        d = d.detach().requires_grad_(True)
        values = objective((xf + d).reshape(shape))
        (g,) = torch.autograd.grad(values.sum(), [d])
        return values.detach(), g.detach()

    def run_phase(phase, start, rho):
        best_d = valid(_ball(start, rho))
        best_v, best_g = value_and_gradient(best_d)
        alpha = eps.clone()
        for _ in range(int(steps)):
            cand = valid(_ball(best_d + alpha[:, None] * _direction(best_g), rho))
            v, g = value_and_gradient(cand)
            up = v > best_v
            if history is not None:
                history.append((phase, alpha.clone(), up.clone()))
            best_d = torch.where(up[:, None], cand, best_d)
            best_g = torch.where(up[:, None], g, best_g)
            best_v = torch.where(up, v, best_v)
            alpha = torch.where(up, alpha, alpha * decay)
        return best_d, best_v

    d = _as64(init).reshape(n, -1)
    if wide > 1:
        d, _ = run_phase(1, d, wide * eps)
    d, v = run_phase(2, d, eps)
    return v, d.reshape(shape)


def item_sensitivity(response, x, unit, eps, inits, steps, wide=2.0, decay=0.9, clip=(0.0, 1.0)):
    """The sensitivity of each (image, unit, eps) item over its ``2 R`` runs.

    ``response(images) -> (M, U)``: every unit's response; ``x``: (B, ...) images; ``unit``: (B,) unit
    indices; ``eps``: (B,) radii; ``inits``: (B, R, ...) the starting perturbation of each restart
    (shared by both signs). Returns a dict: ``sensitivity`` (B,) ``max(0, best value)``; ``values``
    (B, 2R) every run's phase-2 best in the sign-major layout; ``sign`` (B,) +1/-1 and ``restart`` (B,)
    of the best run (the first of equal values); ``delta`` (B, ...) its perturbation; ``norm`` (B,)
    its L2 norm; ``response`` (B,) the unit's response there; ``clean`` (B,) ``r(x)``.
    """
    x = _as64(x)
    b = x.shape[0]
    inits = _as64(inits)
    r = inits.shape[1]
    unit = torch.as_tensor(unit, dtype=torch.long).reshape(b)
    eps = _as64(eps).reshape(b)

    def pick(resp, units):
        return resp.gather(1, units[:, None])[:, 0]

    with torch.no_grad():
        clean = pick(response(x), unit)

    # runs of item i: i * 2R + j; j < R: sign +1, restart j; j >= R: sign -1, restart j - R
    run_sign = torch.cat([torch.ones(r, dtype=DTYPE), -torch.ones(r, dtype=DTYPE)])
    run_restart = torch.cat([torch.arange(r), torch.arange(r)])
    xs = x.repeat_interleave(2 * r, dim=0)
    units = unit.repeat_interleave(2 * r)
    signs = run_sign.repeat(b)
    base = clean.repeat_interleave(2 * r)
    starts = torch.stack([inits[i, run_restart] for i in range(b)]).reshape(xs.shape)

    def objective(images):
        return signs * (pick(response(images), units) - base)

    values, deltas = maximise(objective, xs, eps.repeat_interleave(2 * r), starts, steps, wide, decay, clip)
    values = values.reshape(b, 2 * r)
    best = torch.argmax(values, dim=1)
    run = torch.arange(b) * 2 * r + best
    with torch.no_grad():
        reached = pick(response(xs[run] + deltas[run]), unit)
    return {"sensitivity": torch.clamp(values.max(dim=1).values, min=0.0), "values": values,
            "sign": run_sign[best].to(torch.int64), "restart": run_restart[best], "delta": deltas[run],
            "norm": torch.linalg.vector_norm(deltas[run].reshape(b, -1), dim=1), "response": reached,
            "clean": clean}
