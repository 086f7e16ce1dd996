"""APGD (Auto-PGD) under Linf and L2: the white-box attacks of AutoAttack, compiled and batched.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020), Algorithm 1, as its authors' code runs it
(``autoattack/autopgd_base.py`` of fra31/auto-attack, which every published AutoAttack number comes
from; where that code and the paper's text differ, the code is followed and the difference is named
below). It is the first two stages of AutoAttack "standard" (:mod:`advalign_jax.attacks.autoattack`);
its losses are in :mod:`advalign_jax.attacks.apgd_losses`, its step-size schedule in
:mod:`advalign_jax.attacks.apgd_schedule` (their names are importable from here too).

**One run** (:func:`apgd_run`), per example, with radius ``eps``, projection ``P`` onto the
eps-ball around ``x0`` intersected with the pixel box ``[0, 1]``:

- start ``x(0) = clip(x0 + eps * normalise(t))``: Linf ``t ~ U[-1, 1]^d`` scaled so that
  ``max|t| = 1``; L2 ``t ~ N(0, I)`` scaled to unit L2 norm (``normalise(v) = v / (||v||_p + 1e-12)``,
  :func:`random_start`);
- step size ``eta = 2 eps``; ``z = P(x(k) + eta * s(g))`` with ``s(g) = sign(g)`` (Linf) or
  ``g / (||g||_2 + 1e-12)`` (L2), then ``x(k+1) = P(x(k) + a (z - x(k)) + (1 - a)(x(k) - x(k-1)))``
  with momentum ``a = 0.75`` (``a = 1`` on the first step: no momentum). L2 projection:
  ``x0 + d / (||d|| + 1e-12) * min(eps, ||d||)``, then the clip; Linf: clip to the box, then to [0, 1];
- the best point ``x_max`` (highest loss; strict improvement replaces; the start included) and its
  gradient are kept;
- **checkpoints** (:func:`checkpoints`): after ``w_1 = max(int(0.22 N), 1)`` iterations, then with
  window lengths shrinking by ``max(int(0.03 N), 1)`` down to ``max(int(0.06 N), 1)`` — the code's
  integer form of the paper's ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``,
  ``w_j = ceil(p_j N)`` (:func:`paper_checkpoints`); the two agree for N = 100 (0, 22, 41, 57, 70, 80,
  87, 93, 99) and N = 1000, not for every N (N = 50: code 11, 21, 30, 38, 45; paper 11, 21, 29, 35,
  40, 44, 47, 50);
- at checkpoint ``w_j`` the step is **halved and the iterate restarted from x_max** (with x_max's
  gradient; the momentum term then uses ``x_max - x(w_j - 1)``) when
  *condition 1*: ``#{i in [w_{j-1}, w_j): f(x(i+1)) > f(x(i))} <= rho * (w_j - w_{j-1})``, ``rho = 0.75``
  (the paper writes ``<``; the code ``<=``; in the first window the code compares ``f(x(1))`` with
  ``0``, its zero-initialised loss history, instead of with ``f(x(0))``: kept), or
  *condition 2*: the step was not halved at ``w_{j-1}`` and the best loss did not increase since
  ``w_{j-1}`` (never at ``w_1``, as in the code).

**Losses** (per example, ascended; ``pi`` sorts the logits in decreasing order):

- ``ce``: cross-entropy of the true label (APGD-CE);
- ``dlr``: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` (:func:`dlr_loss`);
- ``dlr-targeted``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (:func:`targeted_dlr_loss`)
  towards target ``t`` (APGD-T). The targets are the clean point's classes ranked 2nd, 3rd, ...
  by logit (:func:`top_targets`; for a correctly classified point: the top classes other than the
  true one), one run each, 9 in AutoAttack "standard".

Success is always ``argmax f(x) != y`` (targeted runs too, as in AutoAttack).

**Returned point** (per example): the **last** iterate at which the point was misclassified (the
start included), as the original code (``keep='last'``, the default; ``keep='first'``: the first one),
or, never misclassified, the iterate of highest loss (the paper's ``x_max``; the original code
returns the clean point there, which makes no difference to robust accuracy).

**Runs** (:func:`apgd`): ``n_restarts`` runs (times ``n_target_classes`` targets for APGD-T, targets
in the outer loop), each from a fresh random start, on the points not yet misclassified; an example
keeps the first run that fools it, else the run of highest loss. As in AutoAttack, points that the
model already misclassifies are not attacked (returned unchanged, success True). APGD-T's targets
may also be given explicitly (``targets=``).

Checked (``tests/attacks/test_apgd.py``) against an independent per-example PyTorch implementation written
from the paper (``tests/references/reference_apgd.py``: every iterate, step size and checkpoint decision, float64,
to 1e-9) and, where ``torchattacks`` 3.5.1 is installed, against the authors' code as it ports it
(Linf CE, DLR and targeted DLR over 100 iterations: the best point, the returned point and f_max agree
to about 1e-14 in float64).

**Randomised models** (AutoAttack's ``rand`` version): with ``model_key``, ``logits_fn`` is called as
``logits_fn(x, key)`` with a fresh key for every forward pass, and ``eot_iter`` draws (20 in
``rand``) are averaged per step: the gradient is their mean (Expectation over Transformation), while
the loss and the prediction are those of the last draw, as the original code. Without ``model_key``
the model is deterministic and one draw is computed, whatever ``eot_iter`` says (the draws would be
identical). ``tests/attacks/test_autoattack.py`` checks a first step against the mean of the draws' gradients.

Every example is independent of its batch mates: its random draws come from ``fold_in(key, index)``
(``index`` = its position in the dataset, default its position in the batch), its step size, counts
and checkpoint decisions are its own, and the model must run in inference mode. ``eps`` may be a
scalar or an (N,) array. All loops are ``lax`` loops, so compile time does not depend on
``n_iter``, ``n_restarts`` or ``n_target_classes``; a run that has no example left to attack is
skipped (``lax.cond``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from advalign_jax.attacks.apgd_losses import (DLR_EPS, LOSSES, apgd_loss, ce_loss, dlr_loss, targeted_dlr_loss,
                                              top_targets)
from advalign_jax.attacks.apgd_schedule import (Controller, _check_arrays, checkpoints, controller_init,
                                                controller_update, halving_decisions, paper_checkpoints)

# The public names of APGD, its losses and its schedule included.
__all__ = ["APGDConfig", "APGD_CE", "APGD_T", "CLEAN_DRAW", "Controller", "DLR_EPS", "KEEPS", "L2", "LINF", "LOSSES",
           "NORMALISE_EPS", "apgd", "apgd_loss", "apgd_run", "apgd_step", "ce_loss", "checkpoints",
           "controller_init", "controller_update", "dlr_loss", "halving_decisions", "lp_norm", "normalise",
           "paper_checkpoints", "project", "random_start", "run_starts", "targeted_dlr_loss", "top_targets"]

L2, LINF = "l2", "linf"
KEEPS = ("first", "last")
NORMALISE_EPS = 1e-12  # normalise(v) = v / (||v|| + 1e-12), as the original code
CLEAN_DRAW = 2**31 - 1  # a randomised model's key for the clean prediction (runs use fold_in(model_key, r))


@dataclasses.dataclass(frozen=True)
class APGDConfig:
    """Everything that defines an APGD attack except the radius (which may differ per example).

    ``initial_step`` is relative to eps (2 eps); ``momentum`` is the paper's alpha; ``rho`` the
    condition-1 threshold. ``n_target_classes`` is used by the ``dlr-targeted`` loss only;
    ``eot_iter`` by randomised models only (module docstring).
    """

    norm: str = LINF
    n_iter: int = 100
    n_restarts: int = 1
    loss: str = "ce"
    n_target_classes: int = 9
    rho: float = 0.75
    momentum: float = 0.75
    initial_step: float = 2.0
    keep: str = "last"
    clip: Optional[tuple] = (0.0, 1.0)
    eot_iter: int = 1

    def __post_init__(self):
        if self.norm not in (L2, LINF):
            raise ValueError(f"APGD norm must be 'l2' or 'linf', got {self.norm!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"APGD loss must be one of {LOSSES}, got {self.loss!r}")
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {KEEPS}, got {self.keep!r}")
        if self.n_iter < 1:
            raise ValueError(f"n_iter must be at least 1, got {self.n_iter}")
        if self.n_restarts < 1:
            raise ValueError(f"n_restarts must be at least 1, got {self.n_restarts}")
        if self.targeted and self.n_target_classes < 1:
            raise ValueError(f"n_target_classes must be at least 1, got {self.n_target_classes}")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum}")
        if self.initial_step <= 0:
            raise ValueError(f"initial_step must be positive, got {self.initial_step}")
        if self.eot_iter < 1:
            raise ValueError(f"eot_iter must be at least 1, got {self.eot_iter}")

    @property
    def targeted(self) -> bool:
        return self.loss == "dlr-targeted"

    @property
    def n_runs(self) -> int:
        return self.n_restarts * (self.n_target_classes if self.targeted else 1)


# AutoAttack "standard" (its version='standard'): APGD-CE, 100 iterations, 1 restart; APGD-T,
# 100 iterations, 9 targets, 1 restart each. Pass norm= via dataclasses.replace.
APGD_CE = APGDConfig(loss="ce")
APGD_T = APGDConfig(loss="dlr-targeted", n_target_classes=9)


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------


def _per_example(v, x):
    """A scalar, (N,) or (N, 1, ..., 1) array -> shape (N, 1, ..., 1) in x's dtype."""
    v = jnp.asarray(v, x.dtype)
    v = jnp.broadcast_to(v, x.shape[:1]) if v.ndim == 0 else v
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _axes(x):
    return tuple(range(1, x.ndim))


def lp_norm(v, norm: str):
    """Per-example Linf (max |v|) or L2 norm, shape (N, 1, ..., 1)."""
    if norm == LINF:
        return jnp.max(jnp.abs(v), axis=_axes(v), keepdims=True)
    return jnp.sqrt(jnp.sum(v * v, axis=_axes(v), keepdims=True))


def normalise(v, norm: str):
    """``v / (||v||_p + 1e-12)`` per example."""
    return v / (lp_norm(v, norm) + NORMALISE_EPS)


def project(x, x0, eps, norm: str, clip: Optional[tuple]):
    """Onto the eps-ball around x0, then into the pixel box. ``eps``: (N, 1, ..., 1).

    Linf: ``clip(x, x0 - eps, x0 + eps)``; L2: ``x0 + normalise(d) * min(eps, ||d||)``."""
    if norm == LINF:
        x = jnp.clip(x, x0 - eps, x0 + eps)
    else:
        d = x - x0
        x = x0 + normalise(d, L2) * jnp.minimum(eps, lp_norm(d, L2))
    if clip is not None:
        x = jnp.clip(x, clip[0], clip[1])
    return x


def apgd_step(x, x_prev, grad, step_size, x0, eps, a, norm: str, clip: Optional[tuple]):
    """``z = P(x + eta s(g))``; ``P(x + a (z - x) + (1 - a)(x - x_prev))`` (module docstring)."""
    direction = jnp.sign(grad) if norm == LINF else normalise(grad, L2)
    z = project(x + step_size * direction, x0, eps, norm, clip)
    return project(x + a * (z - x) + (1.0 - a) * (x - x_prev), x0, eps, norm, clip)


def random_start(key, x0, eps, norm: str, index=None, clip: Optional[tuple] = (0.0, 1.0)):
    """``clip(x0 + eps * normalise(t))`` with ``t`` drawn from ``fold_in(key, index[i])`` for example i:
    Linf ``U[-1, 1]``, L2 ``N(0, 1)`` per pixel. ``eps``: scalar, (N,) or (N, 1, ..., 1)."""
    x0 = jnp.asarray(x0)
    index = jnp.arange(x0.shape[0]) if index is None else jnp.asarray(index)
    eps = _per_example(eps, x0)

    def draw(i):
        k = jax.random.fold_in(key, i)
        if norm == LINF:
            return jax.random.uniform(k, x0.shape[1:], x0.dtype, -1.0, 1.0)
        return jax.random.normal(k, x0.shape[1:], x0.dtype)

    x = x0 + eps * normalise(jax.vmap(draw)(index), norm)
    if clip is not None:
        x = jnp.clip(x, clip[0], clip[1])
    return x


# ----------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------


def apgd_run(logits_fn: Callable, x0, y, eps, x_start, cfg: APGDConfig, target=None, trace: bool = False,
             model_key=None) -> dict:
    """One APGD run from the given start ``x_start`` (already in the feasible set); ``model_key``: the
    model is randomised, ``logits_fn(x, key)`` (module docstring).

    Returns a dict of per-example arrays: ``x_adv`` (the last misclassified iterate, or the first with
    ``keep='first'``; the best-loss iterate where never misclassified), ``success`` (misclassified at some
    iterate, the start included), ``x_best`` and ``loss_best`` (x_max, f(x_max)); with ``trace=True``
    also ``trace_x`` (n_iter, N, ...) = x(1) .. x(N), ``trace_step`` (n_iter, N) = the step size after
    each iteration's checkpoint decision, ``trace_loss`` (n_iter, N) = f(x(1)) .. f(x(N)).
    """
    x0 = jnp.asarray(x0)
    y = jnp.asarray(y)
    eps_b = _per_example(eps, x0)
    expand = (-1,) + (1,) * (x0.ndim - 1)
    dtype = x0.dtype

    def one_draw(x, k):
        def total(z):
            logits = logits_fn(z) if model_key is None else logits_fn(z, k)
            per = apgd_loss(logits, y, cfg.loss, target)
            return jnp.sum(per), (per, logits)  # examples are independent: d total / d x_i = d f_i / d x_i

        (_, (per, logits)), g = jax.value_and_grad(total, has_aux=True)(x)
        return per, logits, g

    def loss_grad(x, i):
        if model_key is None or cfg.eot_iter == 1:
            return one_draw(x, None if model_key is None else jax.random.fold_in(model_key, i))

        def draw(g_sum, j):
            per, logits, g = one_draw(x, jax.random.fold_in(jax.random.fold_in(model_key, i), j))
            return g_sum + g, (per, logits)

        g_sum, (pers, logitss) = jax.lax.scan(draw, jnp.zeros_like(x), jnp.arange(cfg.eot_iter))
        return pers[-1], logitss[-1], g_sum / cfg.eot_iter  # the last draw's loss and logits, as the code

    def sel(mask, a, b):
        return jnp.where(mask.reshape(expand), a, b)

    loss0, logits0, g0 = loss_grad(x_start, 0)
    fooled0 = jnp.argmax(logits0, axis=1) != y
    step0 = jnp.asarray(cfg.initial_step, dtype) * eps_b
    init = dict(x=x_start, x_prev=x_start, g=g0, step=step0, x_best=x_start, g_best=g0, x_adv=x_start,
                fooled=fooled0, ctrl=controller_init(loss0))
    is_check, threshold = _check_arrays(cfg.n_iter, cfg.rho)

    def body(c, xs):
        i, check, thr = xs
        a = jnp.where(i == 0, jnp.asarray(1.0, dtype), jnp.asarray(cfg.momentum, dtype))
        x_new = apgd_step(c["x"], c["x_prev"], c["g"], c["step"], x0, eps_b, a, cfg.norm, cfg.clip)
        loss, logits, g = loss_grad(x_new, i + 1)
        wrong = jnp.argmax(logits, axis=1) != y
        take = wrong if cfg.keep == "last" else jnp.logical_and(wrong, jnp.logical_not(c["fooled"]))
        # the code compares f(x(1)) with its zero history except when N = 1 (then with itself)
        ctrl, halve, improved = controller_update(c["ctrl"], loss, check, thr,
                                                  count_increase=(i > 0) | (cfg.n_iter > 1))
        x_best = sel(improved, x_new, c["x_best"])
        g_best = sel(improved, g, c["g_best"])
        step = jnp.where(halve.reshape(expand), c["step"] / 2, c["step"])
        new = dict(x=sel(halve, x_best, x_new), x_prev=c["x"], g=sel(halve, g_best, g), step=step,
                   x_best=x_best, g_best=g_best, x_adv=sel(take, x_new, c["x_adv"]),
                   fooled=jnp.logical_or(c["fooled"], wrong), ctrl=ctrl)
        out = (x_new, step.reshape(-1), loss) if trace else None
        return new, out

    final, ys = jax.lax.scan(body, init, (jnp.arange(cfg.n_iter), jnp.asarray(is_check), jnp.asarray(threshold)))
    result = dict(x_adv=sel(final["fooled"], final["x_adv"], final["x_best"]), success=final["fooled"],
                  x_best=final["x_best"], loss_best=final["ctrl"].best_loss)
    if trace:
        result.update(trace_x=ys[0], trace_step=ys[1], trace_loss=ys[2])
    return result


# ----------------------------------------------------------------------------------------------------
# Restarts and targets
# ----------------------------------------------------------------------------------------------------


def run_starts(key, x, eps, cfg: APGDConfig, index=None):
    """The starting points of every run: (n_runs, N, ...); run r draws from ``fold_in(key, r)``."""
    return jnp.stack([random_start(jax.random.fold_in(key, r), x, eps, cfg.norm, index, cfg.clip)
                      for r in range(cfg.n_runs)])


def apgd(logits_fn: Callable, x, y, eps, cfg: APGDConfig = APGD_CE, key=None, index=None, mask=None,
         targets=None, model_key=None):
    """Runs APGD (all restarts, and all targets for ``dlr-targeted``); returns ``(x_adv, success)``.

    ``logits_fn`` maps a batch to logits (inference mode); ``y`` the true labels; ``eps`` a scalar or
    (N,) array; ``key`` the PRNG key of the random starts (default ``PRNGKey(0)``, as AutoAttack's
    fixed seed 0); ``index`` (N,) ints: each example's id for its random draws (default 0..N-1; pass
    dataset positions to make results independent of batching); ``mask`` (N,) bool: the examples to
    attack (default all); ``targets`` (N,) or (N, T) ints: the target classes of ``dlr-targeted``, one
    run (times ``n_restarts``) per column, instead of the top ``n_target_classes``
    (:func:`top_targets`); ``model_key``: the model is randomised, ``logits_fn(x, key)`` (module
    docstring). ``success``: misclassified at ``x_adv``. Examples outside ``mask`` or already
    misclassified are returned unchanged. Wrap in ``jax.jit`` (``cfg`` static) to compile.
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    n = x.shape[0]
    eps_b = _per_example(eps, x)
    key = jax.random.PRNGKey(0) if key is None else key
    index = jnp.arange(n) if index is None else jnp.asarray(index)
    mask = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    expand = (-1,) + (1,) * (x.ndim - 1)
    if model_key is None:
        clean_logits = logits_fn(x)
    else:
        clean_logits = logits_fn(x, jax.random.fold_in(model_key, CLEAN_DRAW))
    wrong0 = jnp.argmax(clean_logits, axis=1) != y
    to_attack = jnp.logical_and(mask, jnp.logical_not(wrong0))
    n_runs = cfg.n_runs
    if not cfg.targeted:
        if targets is not None:
            raise ValueError(f"targets are for the 'dlr-targeted' loss, not {cfg.loss!r}")
    elif targets is None:
        targets = top_targets(clean_logits, cfg.n_target_classes)
    else:
        targets = jnp.asarray(targets)
        targets = targets[:, None] if targets.ndim == 1 else targets
        n_runs = cfg.n_restarts * targets.shape[1]

    def one_run(r, carry):
        x_out, done, best_loss = carry
        active = jnp.logical_and(to_attack, jnp.logical_not(done))

        def attack(_):
            target = jnp.take(targets, r // cfg.n_restarts, axis=1) if cfg.targeted else None
            start = random_start(jax.random.fold_in(key, r), x, eps_b, cfg.norm, index, cfg.clip)
            res = apgd_run(logits_fn, x, y, eps_b, start, cfg, target,
                           model_key=None if model_key is None else jax.random.fold_in(model_key, r))
            fooled = jnp.logical_and(active, res["success"])
            better = jnp.logical_and(jnp.logical_and(active, jnp.logical_not(res["success"])),
                                     res["loss_best"] > best_loss)
            out = jnp.where(fooled.reshape(expand), res["x_adv"], x_out)
            out = jnp.where(better.reshape(expand), res["x_best"], out)
            return out, jnp.logical_or(done, fooled), jnp.where(better, res["loss_best"], best_loss)

        return jax.lax.cond(jnp.any(active), attack, lambda _: carry, None)

    init = (x, wrong0, jnp.full((n,), -jnp.inf, jnp.promote_types(clean_logits.dtype, jnp.float32)))
    x_adv, success, _ = jax.lax.fori_loop(0, n_runs, one_run, init)
    return x_adv, success
