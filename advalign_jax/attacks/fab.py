"""FAB (Fast Adaptive Boundary) under Linf and L2, untargeted and targeted (FAB-T), compiled and batched.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack" (ICML
2020), as AutoAttack runs it: ``autoattack/fab_base.py`` and ``fab_projections.py`` of
fra31/auto-attack, which torchattacks 3.5.1 ports unchanged in ``attacks/fab.py`` (AutoAttack
"standard" runs FAB-T; "plus" runs untargeted FAB too). FAB looks for the smallest perturbation
that flips the decision; AutoAttack counts a point as broken when the perturbation found is within
the radius eps.

**One run** (:func:`fab_run`), per example, with ``x_o`` the input and ``x(0)`` the start (``x_o``,
or for restarts after the first ``clip(x_o + eps/2 * normalise(t))``, ``t`` uniform in [-1, 1]
(Linf) or Gaussian (L2), :func:`fab_start`):

- **linearise** at ``x(i)`` (:func:`boundary`): untargeted, for every class ``k != y``
  ``df_k = f_k(x) - f_y(x)`` and ``dg_k = grad f_k(x) - grad f_y(x)``, and the class of the nearest
  linearised boundary ``k* = argmin_k |df_k| / (||dg_k||_q + 1e-12)`` (``q`` the dual norm: L1 for
  Linf, L2 for L2); targeted (FAB-T), the one boundary of the target class ``t``:
  ``df = f_t - f_y``, ``dg = grad (f_t - f_y)``. The hyperplane is ``{z : <w, z> = b}`` with
  ``w = dg_k*`` and ``b = <w, x(i)> - df_k*``;
- **project** both ``x(i)`` and ``x_o`` onto it within the pixel box (:func:`project_linf`,
  :func:`project_l2`: the smallest Lp step ``d`` with ``<w, p + d> = b`` and ``lo <= p + d <= hi``),
  giving ``d1`` and ``d2``;
- **step**: ``a_j = max(||d_j||_p, 1e-8)``, ``alpha = min(max(a1 / (a1 + a2), 0), alpha_max)``
  (``alpha_max = 0.1``), and ``x(i+1) = clip((x(i) + eta d1)(1 - alpha) + (x_o + eta d2) alpha)``
  with the overshoot ``eta = 1.05`` (:func:`fab_step`);
- **keep and step back**: when ``x(i+1)`` is misclassified, it replaces the best point if its
  distance ``||x(i+1) - x_o||_p`` is smaller than the best so far, and the iterate is pulled back
  towards the input, ``x(i+1) <- x_o + beta (x(i+1) - x_o)`` with ``beta = 0.9``. This backward step,
  inside the loop, is all the shrinking of successful points toward the input that AutoAttack's FAB
  does: its code has no search after the loop. A run always makes ``n_iter`` iterations (100 in
  AutoAttack), so points keep getting closer after they are first broken.

**The projections** (derived here, the same minimisers as the authors' code computes with its
binary searches). With ``c = <w, p> - b`` and the signs of ``w`` and ``c`` flipped so that
``c >= 0``, the point must lower ``<w, .>`` by ``c``; coordinate ``i`` moves against ``sign(w_i)``
and has room ``r_i`` (``p_i - lo`` when ``w_i > 0``, ``hi - p_i`` when ``w_i < 0``):

- Linf: ``d_i = -sign(w_i) min(lambda, r_i)`` with ``lambda`` solving
  ``g(lambda) = sum_i |w_i| min(lambda, r_i) = c``;
- L2: ``d_i = -sign(w_i) min(alpha |w_i|, r_i)`` with ``alpha`` solving
  ``g(alpha) = sum_i |w_i| min(alpha |w_i|, r_i) = c``.

``g`` is piecewise linear, increasing and concave (breakpoints ``r_i`` for Linf, ``r_i / |w_i|``
for L2, where coordinates saturate). Newton's method from 0 never passes the root on such a function
and lands exactly on the root's linear piece after passing a few breakpoints (3 on typical FAB steps);
the root is then read off that piece, ``(c - sum_saturated) / slope_unsaturated``, the same formula
the authors' code evaluates after locating the piece by sorting all breakpoints. Should 50 Newton
steps not suffice, the breakpoints are sorted and the piece found from cumulative sums (sorting is
what the authors' code does always; on XLA:CPU it costs 30 times more at 224 px). Where even the full
room cannot reach the hyperplane (``c >= g(inf)``) every coordinate moves to its bound, as the
authors' code. Coordinates with ``w_i = 0`` (L2: ``|w_i| <
1e-8``, the code's threshold) do not move.

**Runs** (:func:`fab`): ``n_restarts`` runs, times ``n_target_classes`` targets for FAB-T (targets
outer, restarts inner; the targets are the clean point's classes ranked 2nd, 3rd, ... by logit, 9 in
AutoAttack "standard"), each on the points not yet broken; a point is broken when a run found a
misclassified point within distance eps of it, and keeps the first such run's point. Points that no
run breaks, and points the model already misclassifies, are returned unchanged (success True for the
latter, as for APGD).

Checked (``tests/attacks/test_fab.py``) against the authors' code as torchattacks 3.5.1 ports it, in
float64 on small models with the same weights: the projections on random hyperplanes, every iterate
of FAB-T and of untargeted FAB, and the returned points of the full attack; and the step quantities
on hand-worked examples. (torchattacks' own AutoAttack wrapper runs FAB with 10 iterations; the
authors' AutoAttack with 100, as here.)

Every example is independent of its batch mates (random starts from ``fold_in(key, index)``; the
model must run in inference mode). ``eps`` may be a scalar or an (N,) array. Runs and iterations are
``lax`` loops (compile time does not depend on ``n_iter``, restarts or targets); a run with no
example left to attack is skipped. Cost per iteration: one forward pass and one gradient (FAB-T), or
one forward pass and the full Jacobian, one vector-Jacobian product per class (untargeted FAB).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from advalign_jax.attacks.apgd import L2, LINF, _per_example, lp_norm, random_start
from advalign_jax.attacks.apgd_losses import top_targets

SMALL_W = 1e-8  # L2 projection: coordinates with |w| below this do not move (the authors' threshold)
DIST_EPS = 1e-12  # |df| / (||dg||_q + 1e-12)
MIN_STEP = 1e-8  # a_j = max(||d_j||, 1e-8)


@dataclasses.dataclass(frozen=True)
class FABConfig:
    """FAB's hyperparameters (AutoAttack's values by default); ``targeted`` selects FAB-T.

    ``clip`` is the pixel box the projections respect; FAB needs one."""

    norm: str = LINF
    n_iter: int = 100
    n_restarts: int = 1
    targeted: bool = False
    n_target_classes: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    clip: tuple = (0.0, 1.0)

    def __post_init__(self):
        if self.norm not in (L2, LINF):
            raise ValueError(f"FAB norm must be 'l2' or 'linf', got {self.norm!r}")
        if self.n_iter < 1:
            raise ValueError(f"n_iter must be at least 1, got {self.n_iter}")
        if self.n_restarts < 1:
            raise ValueError(f"n_restarts must be at least 1, got {self.n_restarts}")
        if self.targeted and self.n_target_classes < 1:
            raise ValueError(f"n_target_classes must be at least 1, got {self.n_target_classes}")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise ValueError(f"alpha_max must be in [0, 1], got {self.alpha_max}")
        if self.eta <= 0:
            raise ValueError(f"eta must be positive, got {self.eta}")
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {self.beta}")
        if self.clip is None or len(self.clip) != 2 or not self.clip[0] < self.clip[1]:
            raise ValueError(f"FAB projects within the pixel box: clip must be (lo, hi) with lo < hi, got {self.clip}")

    @property
    def n_runs(self) -> int:
        return self.n_restarts * (self.n_target_classes if self.targeted else 1)


# AutoAttack "standard": FAB-T, 100 iterations, 9 targets, 1 restart. Pass norm= via dataclasses.replace.
FAB_T = FABConfig(targeted=True)


# ----------------------------------------------------------------------------------------------------
# Projections onto a hyperplane within the box
# ----------------------------------------------------------------------------------------------------


def _oriented(p, w, b):
    """Flips (w, c = <w, p> - b) so that c >= 0 (c = 0 keeps the sign, as the authors' code)."""
    c = jnp.sum(w * p, axis=1) - b
    sign = jnp.where(c >= 0, 1.0, -1.0).astype(w.dtype)
    return w * sign[:, None], c * sign


def _room(p, w, lo, hi):
    """How far each coordinate can move against sign(w) inside [lo, hi]."""
    return jnp.where(w < 0, hi - p, p - lo)


NEWTON_STEPS = 50


def _root(breaks, sat_value, slope, c):
    """The root of ``g(s) = sum_i min(s * slope_i, sat_value_i) = c`` with ``breaks_i = sat_value_i /
    slope_i`` (where coordinate i saturates), per row: ``(root, feasible)`` (module docstring: Newton's
    method, or the sorted breakpoints if it has not converged after :data:`NEWTON_STEPS` steps)."""
    root, converged = _root_newton(breaks, sat_value, slope, c, NEWTON_STEPS)
    return jax.lax.cond(jnp.all(converged), lambda: (root, c < jnp.sum(sat_value, axis=1)),
                        lambda: _root_sorted(breaks, sat_value, slope, c))


def _root_newton(breaks, sat_value, slope, c, steps: int = NEWTON_STEPS):
    """Newton's method from 0 on the concave, piecewise-linear ``g``: each step solves the current
    piece's line for ``c``, which never passes the root; it has converged when a step passes no
    further breakpoint. Returns ``(root, converged)`` (rows that cannot reach ``c`` count as converged)."""
    feasible = c < jnp.sum(sat_value, axis=1)

    def body(state):
        i, s, passed, done = state
        saturated = breaks <= s[:, None]
        fixed = jnp.sum(jnp.where(saturated, sat_value, 0.0), axis=1)
        rate = jnp.sum(jnp.where(saturated, 0.0, slope), axis=1)
        new = jnp.maximum((c - fixed) / jnp.where(rate > 0, rate, 1.0), 0.0)
        passed_new = jnp.sum(breaks <= new[:, None], axis=1)
        converged = passed_new <= passed  # the line's root lies on the current piece
        return (i + 1, jnp.where(done, s, new), jnp.where(done, passed, passed_new), done | converged)

    zero = jnp.zeros_like(c)
    state = (0, zero, jnp.sum(breaks <= 0, axis=1), ~feasible)
    _, root, _, done = jax.lax.while_loop(lambda st: (st[0] < steps) & ~jnp.all(st[3]), body, state)
    return root, done


def _root_sorted(breaks, sat_value, slope, c):
    """As :func:`_root`, by sorting the breakpoints: ``g`` at every breakpoint from cumulative sums;
    the root is on the last piece starting at or below ``c``."""
    order = jnp.argsort(breaks, axis=1)
    brk = jnp.take_along_axis(breaks, order, axis=1)
    sat = jnp.cumsum(jnp.take_along_axis(sat_value, order, axis=1), axis=1)  # saturated part up to j
    slopes = jnp.take_along_axis(slope, order, axis=1)
    rest = jnp.flip(jnp.cumsum(jnp.flip(slopes, axis=1), axis=1), axis=1)  # sum_{i >= j} slope_i
    after = jnp.concatenate([rest[:, 1:], jnp.zeros_like(rest[:, :1])], axis=1)  # sum_{i > j}
    g_at = sat + jnp.where(jnp.isfinite(brk), brk, 0.0) * after  # g(brk_j)
    j = jnp.sum(g_at <= c[:, None], axis=1)  # breakpoints passed
    sat_j = jnp.where(j > 0, jnp.take_along_axis(sat, jnp.maximum(j - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    slope_j = jnp.where(j > 0, jnp.take_along_axis(after, jnp.maximum(j - 1, 0)[:, None], axis=1)[:, 0],
                        rest[:, 0])
    root = (c - sat_j) / jnp.where(slope_j > 0, slope_j, 1.0)
    feasible = c < sat[:, -1]
    return jnp.maximum(root, 0.0), feasible


def project_linf(p, w, b, clip=(0.0, 1.0)):
    """The smallest Linf step ``d`` (N, D) with ``<w, p + d> = b`` and ``p + d`` in the box, per row
    (module docstring); ``p``, ``w`` (N, D), ``b`` (N,)."""
    lo, hi = clip
    w, c = _oriented(p, w, b)
    room = _room(p, w, lo, hi)
    aw = jnp.abs(w)
    lam, feasible = _root(room, aw * room, aw, c)
    step = jnp.where(feasible[:, None], jnp.minimum(lam[:, None], room), room)
    return jnp.where(w != 0, -jnp.sign(w) * step, 0.0)


def project_l2(p, w, b, clip=(0.0, 1.0)):
    """The smallest L2 step ``d`` (N, D) with ``<w, p + d> = b`` and ``p + d`` in the box, per row
    (module docstring); ``p``, ``w`` (N, D), ``b`` (N,)."""
    lo, hi = clip
    w, c = _oriented(p, w, b)
    room = _room(p, w, lo, hi)
    moving = jnp.abs(w) > SMALL_W
    aw = jnp.where(moving, jnp.abs(w), 0.0)
    breaks = jnp.where(moving, room / jnp.where(moving, aw, 1.0), jnp.inf)
    alpha, feasible = _root(breaks, aw * room, aw * aw, c)
    step = jnp.where(feasible[:, None], jnp.minimum(alpha[:, None] * aw, room), room)
    return jnp.where(moving, -jnp.sign(w) * step, 0.0)


def project(p, w, b, norm: str, clip=(0.0, 1.0)):
    """:func:`project_linf` or :func:`project_l2`."""
    return project_linf(p, w, b, clip) if norm == LINF else project_l2(p, w, b, clip)


# ----------------------------------------------------------------------------------------------------
# The linearised boundary and one step
# ----------------------------------------------------------------------------------------------------


def _flat(v):
    return v.reshape(v.shape[0], -1)


def _dual_norm(g, norm: str):
    """||g||_q over the last axis: q = 1 (dual of Linf) or 2."""
    return jnp.sum(jnp.abs(g), axis=-1) if norm == LINF else jnp.sqrt(jnp.sum(g * g, axis=-1))


def boundary(logits, jac, y, norm: str, target=None):
    """The linearised boundary to cross: ``(w, df)`` with ``w`` (N, D) and ``df`` (N,), such that the
    boundary is ``<w, z - x> + df = 0`` (module docstring).

    Untargeted: ``logits`` (N, K), ``jac`` (N, K, D) the Jacobian; the class k* of the nearest
    boundary ``|df_k| / (||dg_k||_q + 1e-12)`` (true class excluded). Targeted: ``jac`` (N, D) the
    gradient of ``f_t - f_y``, ``logits`` (N,) its value ``f_t - f_y``."""
    if target is not None:
        return jac, logits
    n, k = logits.shape
    rows = jnp.arange(n)
    df = logits - logits[rows, y][:, None]
    dg = jac - jac[rows, y][:, None, :]
    dist = jnp.abs(df) / (_dual_norm(dg, norm) + DIST_EPS)
    dist = jnp.where(jax.nn.one_hot(y, k, dtype=bool), jnp.inf, dist)
    nearest = jnp.argmin(dist, axis=1)
    return dg[rows, nearest], df[rows, nearest]


def fab_step(x, x0, w, df, norm: str, cfg: FABConfig):
    """One FAB step from ``x`` (flattened (N, D); ``x0`` the inputs) across the boundary ``(w, df)``
    of :func:`boundary`; returns ``(x_new, alpha, d1, d2)`` (module docstring)."""
    b = jnp.sum(w * x, axis=1) - df
    d = project(jnp.concatenate([x, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]), norm, cfg.clip)
    n = x.shape[0]
    d1, d2 = d[:n], d[n:]
    size = jnp.maximum(lp_norm(d, norm)[:, 0], MIN_STEP)
    a1, a2 = size[:n], size[n:]
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, cfg.alpha_max)[:, None]
    x_new = (x + cfg.eta * d1) * (1.0 - alpha) + (x0 + cfg.eta * d2) * alpha
    return jnp.clip(x_new, cfg.clip[0], cfg.clip[1]), alpha[:, 0], d1, d2


def fab_start(key, x0, eps, cfg: FABConfig, index=None):
    """A restart's starting point: ``clip(x0 + eps/2 * normalise(t))`` (t drawn per example from
    ``fold_in(key, index)``, as :func:`~advalign_jax.attacks.apgd.random_start`)."""
    return random_start(key, x0, 0.5 * _per_example(eps, jnp.asarray(x0)), cfg.norm, index, cfg.clip)


# ----------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------


def _linearise(logits_fn, x, y, target):
    """(logits or f_t - f_y, Jacobian or its gradient), both at x (unflattened input)."""
    rows = jnp.arange(x.shape[0])
    if target is not None:
        def diff(z):
            z_logits = logits_fn(z)
            per = z_logits[rows, target] - z_logits[rows, y]
            return jnp.sum(per), per  # examples are independent: d sum / d x_i = d per_i / d x_i

        g, per = jax.grad(diff, has_aux=True)(x)
        return per, _flat(g)
    logits, vjp = jax.vjp(logits_fn, x)
    eye = jnp.eye(logits.shape[1], dtype=logits.dtype)
    jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, logits.shape))[0])(eye)  # (K, N, ...)
    return logits, jnp.moveaxis(jac.reshape(jac.shape[0], x.shape[0], -1), 0, 1)  # (N, K, D)


def fab_run(logits_fn: Callable, x0, y, x_start, cfg: FABConfig, target=None, trace: bool = False) -> dict:
    """One FAB run from ``x_start`` (``target`` (N,) for FAB-T). Returns per-example ``x_best`` (the
    closest misclassified point found; ``x0`` where none), ``dist`` (its Lp distance to ``x0``; inf
    where none) and ``found``; with ``trace=True`` also ``trace_x`` (n_iter, N, ...): every iterate
    before its backward step, ``trace_alpha`` (n_iter, N) and ``trace_adv`` (n_iter, N): whether it is
    misclassified."""
    x0 = jnp.asarray(x0)
    y = jnp.asarray(y)
    shape = x0.shape
    flat0 = _flat(x0)
    if cfg.targeted and target is None:
        raise ValueError("FAB-T needs the target classes")
    tgt = target if cfg.targeted else None

    def body(carry, _):
        x, x_best, dist = carry
        val, jac = _linearise(logits_fn, x.reshape(shape), y, tgt)
        w, df = boundary(val, jac, y, cfg.norm, tgt)
        x_new, alpha, _, _ = fab_step(x, flat0, w, df, cfg.norm, cfg)
        adv = jnp.argmax(logits_fn(x_new.reshape(shape)), axis=1) != y
        size = lp_norm(x_new - flat0, cfg.norm)[:, 0]
        better = adv & (size < dist)
        x_best = jnp.where(better[:, None], x_new, x_best)
        dist = jnp.where(better, size, dist)
        out = (x_new.reshape(shape), alpha, adv) if trace else None
        x_new = jnp.where(adv[:, None], flat0 + cfg.beta * (x_new - flat0), x_new)
        return (x_new, x_best, dist), out

    inf = jnp.full(y.shape, jnp.inf, jnp.promote_types(x0.dtype, jnp.float32))
    (_, x_best, dist), ys = jax.lax.scan(body, (_flat(jnp.asarray(x_start)), flat0, inf), None, length=cfg.n_iter)
    result = dict(x_best=x_best.reshape(shape), dist=dist, found=jnp.isfinite(dist))
    if trace:
        result.update(trace_x=ys[0], trace_alpha=ys[1], trace_adv=ys[2])
    return result


# ----------------------------------------------------------------------------------------------------
# Restarts and targets
# ----------------------------------------------------------------------------------------------------


def fab(logits_fn: Callable, x, y, eps, cfg: FABConfig = FAB_T, key=None, index=None, mask=None, targets=None):
    """Runs FAB (all restarts, and all targets for FAB-T); returns ``(x_adv, success)``.

    ``eps``: scalar or (N,): a point is broken by a misclassified point within this distance;
    ``key``: restarts' random starts (default ``PRNGKey(0)``); ``index`` (N,): each example's id for
    its draws (default 0..N-1); ``mask`` (N,) bool: the examples to attack; ``targets`` (N,) or
    (N, T): FAB-T's target classes instead of the top ``n_target_classes``. ``success``: misclassified
    at ``x_adv``; examples not broken, outside ``mask`` or already misclassified are returned
    unchanged. Wrap in ``jax.jit`` (``cfg`` static) to compile."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    n = x.shape[0]
    eps_n = _per_example(eps, x).reshape(-1)
    key = jax.random.PRNGKey(0) if key is None else key
    index = jnp.arange(n) if index is None else jnp.asarray(index)
    mask = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    expand = (-1,) + (1,) * (x.ndim - 1)
    clean_logits = logits_fn(x)
    wrong0 = jnp.argmax(clean_logits, axis=1) != y
    to_attack = mask & ~wrong0
    n_runs = cfg.n_runs
    if not cfg.targeted:
        if targets is not None:
            raise ValueError("targets are for FAB-T (targeted=True)")
    elif targets is None:
        targets = top_targets(clean_logits, cfg.n_target_classes)
    else:
        targets = jnp.asarray(targets)
        targets = targets[:, None] if targets.ndim == 1 else targets
        n_runs = cfg.n_restarts * targets.shape[1]

    def one_run(r, carry):
        x_out, done = carry
        active = to_attack & ~done

        def attack(_):
            target = jnp.take(targets, r // cfg.n_restarts, axis=1) if cfg.targeted else None
            restart = r % cfg.n_restarts
            start = jax.lax.cond(restart > 0, lambda: fab_start(jax.random.fold_in(key, r), x, eps_n, cfg, index),
                                 lambda: x)
            res = fab_run(logits_fn, x, y, start, cfg, target)
            broken = active & res["found"] & (res["dist"] <= eps_n)
            return jnp.where(broken.reshape(expand), res["x_best"], x_out), done | broken

        return jax.lax.cond(jnp.any(active), attack, lambda _: carry, None)

    x_adv, success = jax.lax.fori_loop(0, n_runs, one_run, (x, wrong0))
    return x_adv, success
