"""The largest change of one unit's response within an L2 ball: the optimisation of Guo et al. (2022).

For a unit with response ``r(x)`` (a scalar function of one image) the sensitivity at ``x`` is

    s(x, eps) = max_{||delta||_2 <= eps, x + delta in [lo, hi]} |r(x + delta) - r(x)|

(Guo, Lee, Leclerc, Dapello, Rao, Madry, DiCarlo, "Adversarially trained neural representations may
already be as robust as corresponding biological neural representations", ICML 2022, arXiv 2206.11228,
section 3). No code was released; the procedure follows the paper's list of what "drastically improves
convergence beyond basic PGD":

1. **both signs separately**: the objectives ``f+(delta) = r(x + delta) - r(x)`` and
   ``f-(delta) = r(x) - r(x + delta)`` are maximised by separate runs (``|.|`` has a saddle at 0) and
   the larger kept;
2. **random restarts**: ``R`` independent runs per sign, each from a point drawn uniformly in the ball
   of the first phase (a normal direction, radius ``rho * U^(1/d)``), the same draw for both signs of
   a restart (our choice);
3. **2 eps, then eps**: a first phase in the ball of radius ``wide * eps`` (``wide`` = 2), then a second
   in the ball of radius ``eps`` from the first phase's best point projected onto it;
4. **annealed step**: in each phase the step starts at ``eps`` and is multiplied by ``decay`` (0.9)
   whenever an iteration makes no progress.

One iteration, from the best point ``d*`` of the phase so far (value ``f*``, gradient ``g*``): the
candidate ``d = clip(P_rho(d* + alpha g* / ||g*||_2))`` (``P_rho``: Euclidean projection onto the ball of
radius ``rho``; ``clip``: ``x + d`` into ``[lo, hi]``, which keeps ``d`` in the ball) is evaluated once
(value and gradient in one forward-backward pass); if ``f(d) > f*`` it becomes the best point, otherwise
``alpha <- decay * alpha`` (the next candidate is tried from ``d*`` again). A zero gradient gives a zero
step (no progress). Each phase evaluates its starting point and then ``steps`` candidates.

Projecting onto the ball and then clipping into the box is not the projection onto their
intersection: where the box cuts the ball at interior pixels the search converges more slowly (a linear
unit with a quarter of its pixels at each bound: 1-6% short of the true maximum at 20 steps for eps
0.8-2.5 on 108 pixels, under 1% at 300), one more reason the estimate is a lower bound.

The estimate of a run is the best value of its second phase (every point of which lies in the eps-ball
and the valid range); the estimate of ``s(x, eps)`` is ``max(0, best over signs and restarts)``
(``delta = 0`` is feasible): a **lower bound** of the true maximum, never above it.

Targeted mode ("super-stimuli"): the objective is ``-|r(x + delta) - t|`` for a response level ``t``;
the result is the response reached.

Everything is a pure function of arrays: runs are a leading batch axis (the model is called once on all
of a batch's runs; in inference mode each image's result depends on that image only), so ``jit`` and
sharding along that axis apply, and :func:`maximise` is what the evaluator compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from advalign_jax.errors import ConfigError

_TINY = 1e-30
# Phases of at most this many steps are unrolled by default: XLA:CPU runs a model's passes inside a while
# loop about 2x slower (15 steps of the digits CNN: 1.9 s unrolled, 3.7 s looped; compilation +2 s), and
# the compile time grows with the unrolled steps. The result is the same either way.
UNROLL_MAX_STEPS = 16


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The optimisation's settings (the module docstring).

    ``restarts``: random starts per sign (the study: 100). ``steps``: candidates per phase.
    ``wide``: the first phase's radius in units of eps (2 in the study; 1 skips the wide phase).
    ``decay``: the step's factor after an iteration without progress (0.9; 1 keeps it fixed).
    ``start``: ``'random'`` (uniform in the first phase's ball) or ``'zero'`` (every restart at 0:
    deterministic, for checks). ``clip``: the valid input range ``(lo, hi)``, or ``None``.
    ``unroll``: steps per iteration of the compiled loop (speed only); ``None``: every step when
    ``steps <= UNROLL_MAX_STEPS``, else a plain loop.
    """

    restarts: int = 10
    steps: int = 20
    wide: float = 2.0
    decay: float = 0.9
    start: str = "random"
    clip: Optional[Tuple[float, float]] = (0.0, 1.0)
    unroll: Optional[int] = None  # steps per iteration of the compiled loop; None: UNROLL_MAX_STEPS rule

    def __post_init__(self):
        for key in ("restarts", "steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int,)) and not (isinstance(v, float) and v.is_integer()):
                raise ConfigError(f"search.{key} must be a whole number, got {v!r}")
            if v < 1:
                raise ConfigError(f"search.{key} must be at least 1, got {v}")
        for key in ("wide", "decay"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), (int, float)):
                raise ConfigError(f"search.{key} must be a number, got {getattr(self, key)!r}")
        if not (math.isfinite(self.wide) and self.wide >= 1):
            raise ConfigError(f"search.wide must be a finite factor >= 1, got {self.wide}")
        if not (0 < self.decay <= 1):
            raise ConfigError(f"search.decay must be in (0, 1], got {self.decay}")
        if self.start not in ("random", "zero"):
            raise ConfigError(f"search.start must be 'random' or 'zero', got {self.start!r}")
        if self.clip is not None:
            try:
                lo, hi = (float(v) for v in self.clip)
            except (TypeError, ValueError):
                raise ConfigError(f"search.clip must be (lo, hi) or empty, got {self.clip!r}") from None
            if not lo < hi:
                raise ConfigError(f"search.clip must be (lo, hi) with lo < hi, got {self.clip}")
        if self.unroll is not None and (isinstance(self.unroll, bool) or not isinstance(self.unroll, int)
                                        or self.unroll < 1):
            raise ConfigError(f"search.unroll must be a positive whole number or None, got {self.unroll!r}")


def _norms(v):
    """Per-run L2 norms over every axis but the first, shaped to broadcast against ``v``."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def project(delta, radius):
    """Euclidean projection of each run's ``delta`` onto the L2 ball of its ``radius`` ((B,))."""
    r = jnp.reshape(radius, (-1,) + (1,) * (delta.ndim - 1)).astype(delta.dtype)
    n = _norms(delta)
    return delta * jnp.minimum(1.0, r / jnp.maximum(n, _TINY))


def uniform_ball(key, shape, radius, dtype):
    """Points uniform in the L2 balls of ``radius`` ((B,)): a normal direction scaled to ``rho U^(1/d)``."""
    k1, k2 = jax.random.split(key)
    z = jax.random.normal(k1, shape, dtype)
    d = math.prod(shape[1:])
    u = jax.random.uniform(k2, (shape[0],) + (1,) * (len(shape) - 1), dtype)
    r = jnp.reshape(radius, (-1,) + (1,) * (len(shape) - 1)).astype(dtype)
    return z / jnp.maximum(_norms(z), _TINY) * r * u ** (1.0 / d)


def maximise(objective: Callable, x, eps, keys, config: SearchConfig, init=None):
    """Maximises each run's ``objective`` over its eps-ball (the module docstring).

    ``objective(images) -> (B,)``: the value of each run at its perturbed image (one model call on the
    whole batch); ``x``: (B, ...) the runs' clean images; ``eps``: (B,) radii (> 0); ``keys``: (B, 2)
    one random key per run (its start); ``init``: (B, ...) explicit starting perturbations instead of
    the configured start (checks against other implementations). Returns ``(value, delta)``: the best second-phase value (B,)
    and its perturbation. Pure; traceable under ``jit``.
    """
    eps = jnp.asarray(eps, x.dtype)
    lo, hi = config.clip if config.clip is not None else (None, None)

    def keep_valid(delta):
        return delta if lo is None else jnp.clip(x + delta, lo, hi) - x

    def total(d):
        values = objective(x + d)
        return jnp.sum(values), values

    value_and_grad = jax.value_and_grad(total, has_aux=True)

    def evaluate(delta):
        # each run's value and gradient in one forward-backward pass (runs are independent: the gradient
        # of the sum is each run's own)
        (_, values), grad = value_and_grad(delta)
        return values, grad

    def phase(delta, radius):
        delta = keep_valid(project(delta, radius))
        best, grad = evaluate(delta)
        alpha = eps

        def body(_, carry):
            best_d, best_v, best_g, alpha = carry
            step = best_g / jnp.maximum(_norms(best_g), _TINY)
            step = jnp.where(_norms(best_g) > 0, step, 0.0)
            cand = keep_valid(project(best_d + jnp.reshape(alpha, (-1,) + (1,) * (x.ndim - 1)) * step, radius))
            v, g = evaluate(cand)
            better = v > best_v
            b = jnp.reshape(better, (-1,) + (1,) * (x.ndim - 1))
            return (jnp.where(b, cand, best_d), jnp.where(better, v, best_v), jnp.where(b, g, best_g),
                    jnp.where(better, alpha, alpha * config.decay))

        unroll = (int(config.steps) if int(config.steps) <= UNROLL_MAX_STEPS else 1) if config.unroll is None \
            else max(1, min(int(config.unroll), int(config.steps)))
        best_d, best_v, _, _ = jax.lax.fori_loop(0, int(config.steps), body, (delta, best, grad, alpha), unroll=unroll)
        return best_d, best_v

    if init is not None:
        delta = jnp.asarray(init, x.dtype)
    elif config.start == "zero":
        delta = jnp.zeros_like(x)
    else:
        delta = jax.vmap(lambda k, r: uniform_ball(k, (1,) + x.shape[1:], r[None], x.dtype)[0])(
            keys, eps * config.wide)
    if config.wide > 1:
        delta, _ = phase(delta, eps * config.wide)
    delta, value = phase(delta, eps)
    return value, delta


def run_grid(restarts: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """``(sign, restart)`` of the ``2 R`` runs of one (image, unit, eps) item, sign-major: runs
    ``0 .. R-1`` maximise ``+(r(x + d) - r(x))``, runs ``R .. 2R-1`` its negative; run ``k`` and
    ``k + R`` start from the same draw."""
    sign = jnp.concatenate([jnp.ones(restarts), -jnp.ones(restarts)])
    restart = jnp.concatenate([jnp.arange(restarts), jnp.arange(restarts)])
    return sign, restart


def item_sensitivity(response: Callable, x, unit, eps, key, config: SearchConfig, target=None):
    """The sensitivity of items: each (image, unit, eps) of a batch, over ``2 R`` runs.

    ``response(images) -> (M, U)``: every unit's response (the model with its variables bound);
    ``x`` (B, ...) images; ``unit`` (B,) int unit indices; ``eps`` (B,); ``key`` (B, 2) one key per item
    (restart ``k`` starts from ``fold_in(key, k)``); ``target``: (B,) response levels for the targeted
    mode, or ``None``. Returns ``{'sensitivity' (B,): max(0, best |change|) (untargeted) or the best
    ``-|r - t|`` (targeted), 'response' (B,): the response at the best point, 'clean' (B,): r(x),
    'sign' (B,): +1 or -1, the sign of the best run, 'restart' (B,): its restart, 'norm' (B,): its
    ||delta||_2}``.
    """
    b = x.shape[0]
    r = int(config.restarts)
    sign, restart = run_grid(r)
    clean = jnp.take_along_axis(response(x), unit[:, None], axis=1)[:, 0]
    xs = jnp.repeat(x, 2 * r, axis=0)
    units = jnp.repeat(unit, 2 * r)
    signs = jnp.tile(sign, b).astype(x.dtype)
    clean_s = jnp.repeat(clean, 2 * r)
    run_keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(restart))(key).reshape(b * 2 * r, -1)
    tgt = None if target is None else jnp.repeat(jnp.asarray(target, x.dtype), 2 * r)

    def unit_response(images):
        return jnp.take_along_axis(response(images), units[:, None], axis=1)[:, 0]

    def objective(images):
        value = unit_response(images)
        return signs * (value - clean_s) if tgt is None else -jnp.abs(value - tgt)

    value, delta = maximise(objective, xs, jnp.repeat(jnp.asarray(eps, x.dtype), 2 * r), run_keys, config)
    value = value.reshape(b, 2 * r)
    best = jnp.argmax(value, axis=1)
    reached = unit_response(xs + delta).reshape(b, 2 * r)
    norms = _norms(delta).reshape(b, 2 * r)
    pick = lambda a: jnp.take_along_axis(a, best[:, None], axis=1)[:, 0]  # noqa: E731
    top = pick(value)
    return {"sensitivity": jnp.maximum(top, 0.0) if target is None else top,
            "response": pick(reached), "clean": clean,
            "sign": sign[best].astype(jnp.int32), "restart": restart[best].astype(jnp.int32), "norm": pick(norms)}
