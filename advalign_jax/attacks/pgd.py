"""Projected gradient descent (PGD) under L2 and Linf, compiled and batched, with per-example radii.

Conventions (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
and the Madry lab's ``robustness`` library, MadryLab/robustness ``robustness/attack_steps.py`` and
``robustness/attacker.py``, unless stated):

- **Step**: L2 ``x <- x + a * g / (||g||_2 + 1e-10)`` per example; Linf ``x <- x + a * sign(g)``;
  ``g`` is the gradient of the per-example loss w.r.t. the input. ``a`` is absolute, or ``a * eps``
  with ``relative_step=True`` (foolbox's convention).
- **Projection** of ``d = x - x0`` after each step (:func:`project`):

  =============  =====================================  ====================================
  ``ball``       L2: ``d * min(1, eps / ||d||)``;       correct PGD (the default)
                 Linf: ``clip(d, -eps, eps)``
  ``sphere``     L2: ``x = x0 + eps * d / ||d||``        the adversarial-alignment reference
  ``accumulate`` L2: ``x = x + eps * d / ||d||``         that reference before its last fix
  ``renorm``     L2: ``d * eps / (||d|| + 1e-7)`` where   ``robustness``'s L2 projection,
                 ``||d|| > eps`` (``torch.renorm``)     ``d.renorm(p=2, dim=0, maxnorm=eps)``
  ``clip_renorm`` L2: clip ``x0 + d`` first, then        TRADES's L2 attack (``trades.py``)
                 ``renorm``
  =============  =====================================  ====================================

  then the result is clipped to the valid pixel range (``clip``; None = no clipping; ``clip_renorm``
  clips before its renorm instead).
- **Random start**: ``none``; ``sphere`` (a Gaussian direction scaled to norm eps, the L2 start of
  ``robustness``); ``ball`` (uniform in the L2 ball, foolbox); ``box`` (uniform in
  ``[-r, r]`` per pixel, the Linf start of ``robustness``; ``start_radius`` sets r, default eps);
  ``normal`` (``x0 + r N(0, I)``, r = ``start_radius``, not clipped: TRADES's ``x + 0.001 randn``).
- **Loss**: per-example cross-entropy or the logit margin. Untargeted attacks ascend the loss of the
  true label; targeted attacks (``targeted=True``, ``y`` = target) descend the cross-entropy to the
  target (margin: ascend ``z_t - max_{i!=t} z_i``). ``loss`` may also be a function ``(logits, y) ->
  (N,)`` that the attack ascends (TRADES's KL to the clean prediction, with ``y`` what it needs).
- **Zero gradients** (``zero_grad``): ``none`` (the step above); ``random`` (L2 only, TRADES's L2
  attack: the step is ``a * g / ||g||`` exactly, and an example whose gradient is zero steps along a
  ``N(0, I)`` draw instead, unnormalised, as ``trades.py`` does).
- **Returned iterate**: the last, or with ``use_best=True`` the iterate of highest loss per example
  among all iterates (the random start and the final one included; strict improvement replaces), as
  ``robustness``'s ``use_best``.
- **Restarts**: with ``restarts > 1`` each example keeps the first restart that succeeds (else the
  last), as ``robustness`` does.

Every example is independent of its batch mates (the model must run in inference mode); ``eps`` may
be a scalar or a per-example array. The loop is a ``lax.fori_loop``, so compile time does not grow
with the number of steps; loops of at most :data:`UNROLL_MAX_STEPS` steps are unrolled (``unroll``):
the same operations, which XLA schedules better as straight-line code (the results agree to float32
rounding).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

L2, LINF = "l2", "linf"
PROJECTIONS = ("ball", "sphere", "accumulate", "renorm", "clip_renorm")
STARTS = ("none", "sphere", "ball", "box", "normal")
ZERO_GRADS = ("none", "random")
RENORM_EPS = 1e-7  # torch.renorm's: maxnorm / (norm + 1e-7)
ZERO_GRAD_SALT = 0x5EED  # the zero-gradient draws' key: fold_in(key, salt), apart from the start's draws
LOSSES = ("ce", "margin")
GRAD_EPS = 1e-10


# Step loops this short are unrolled by default: the same arithmetic as one straight-line program, which
# XLA schedules better than a while loop (the minimal-eps search's 3-step attacks on a small CNN ran 1.4-3x
# faster on XLA:CPU, benchmarks/search_breakdown.py); longer loops stay loops so compile time stays flat.
UNROLL_MAX_STEPS = 8


@dataclasses.dataclass(frozen=True)
class PGDConfig:
    """Everything that defines a PGD attack except the radius (which may differ per example)."""

    norm: str = L2
    steps: int = 10
    step_size: float = 0.1
    relative_step: bool = False
    projection: str = "ball"
    random_start: str = "none"
    start_radius: Optional[float] = None  # box start half-width (default: eps)
    targeted: bool = False
    loss: str = "ce"
    use_best: bool = False
    restarts: int = 1
    clip: Optional[tuple] = (0.0, 1.0)
    unroll: Optional[bool] = None  # unroll the step loop; None: when steps <= UNROLL_MAX_STEPS (module docstring)
    zero_grad: str = "none"

    def __post_init__(self):
        if self.norm not in (L2, LINF):
            raise ValueError(f"norm must be 'l2' or 'linf', got {self.norm!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.norm == LINF and self.projection != "ball":
            raise ValueError(f"the {self.projection!r} projection is an L2 convention; Linf uses 'ball'")
        if self.random_start not in STARTS:
            raise ValueError(f"random_start must be one of {STARTS}, got {self.random_start!r}")
        if not callable(self.loss) and self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES} or a function (logits, y) -> (N,), got {self.loss!r}")
        if callable(self.loss) and (self.restarts > 1 or self.targeted):
            raise ValueError("a loss function is ascended as it is: no restarts, no targeted flag")
        if self.zero_grad not in ZERO_GRADS:
            raise ValueError(f"zero_grad must be one of {ZERO_GRADS}, got {self.zero_grad!r}")
        if self.zero_grad == "random" and self.norm != L2:
            raise ValueError("zero_grad='random' is TRADES's L2 convention")
        if self.random_start == "normal" and not self.start_radius:
            raise ValueError("random_start='normal' needs start_radius (the standard deviation)")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.step_size <= 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be at least 1, got {self.restarts}")


def _per_example(v, x):
    """Broadcasts a scalar or (N,) array against x of shape (N, ...)."""
    v = jnp.asarray(v, x.dtype)
    v = jnp.broadcast_to(v, x.shape[:1]) if v.ndim == 0 else v
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def l2_norm(d):
    """Per-example L2 norm over all non-batch axes, shape (N, 1, ..., 1)."""
    return jnp.sqrt(jnp.sum(d * d, axis=tuple(range(1, d.ndim)), keepdims=True))


def per_example_loss(logits, y, loss: str = "ce", targeted: bool = False):
    """The loss each example's attack ascends (see module docstring), shape (N,); at least float32."""
    if callable(loss):
        return loss(logits, y)
    y = jnp.asarray(y)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    if loss == "ce":
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(dtype)), y[:, None], axis=1)[:, 0]
        return -ce if targeted else ce
    z = logits.astype(dtype)
    z_y = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(y, z.shape[1], dtype=bool), -jnp.inf, z)
    margin = jnp.max(others, axis=1) - z_y
    return -margin if targeted else margin


def step(x, grad, step_size, norm: str):
    """One ascent step: L2 ``x + a g/(||g||+1e-10)``; Linf ``x + a sign(g)``. ``step_size``: (N,1,..)."""
    if norm == L2:
        return x + step_size * grad / (l2_norm(grad) + GRAD_EPS)
    return x + step_size * jnp.sign(grad)


def project(x, x0, eps, norm: str, projection: str, clip: Optional[tuple]):
    """The projection of the module docstring, then clipping. ``eps``: (N, 1, ..., 1)."""
    d = x - x0
    if norm == LINF:
        x = x0 + jnp.clip(d, -eps, eps)
    else:
        n = l2_norm(d)
        safe = jnp.where(n > 0, n, 1.0)
        if projection == "ball":
            x = x0 + d * jnp.minimum(1.0, eps / safe)
        elif projection == "renorm":
            x = x0 + renorm(d, eps)
        elif projection == "clip_renorm":  # TRADES: delta = clamp(x0 + delta, lo, hi) - x0, then renorm
            d = (jnp.clip(x, clip[0], clip[1]) if clip is not None else x) - x0
            return x0 + renorm(d, eps)
        elif projection == "sphere":
            x = jnp.where(n > 0, x0 + eps * d / safe, x)
        else:  # accumulate
            x = jnp.where(n > 0, x + eps * d / safe, x)
    if clip is not None:
        x = jnp.clip(x, clip[0], clip[1])
    return x


def renorm(d, eps):
    """``torch.renorm(d, p=2, dim=0, maxnorm=eps)``: each example's ``d`` scaled by
    ``eps / (||d|| + 1e-7)`` where ``||d|| > eps``, unchanged elsewhere."""
    n = l2_norm(d)
    return d * jnp.where(n > eps, eps / (n + RENORM_EPS), 1.0)


def random_start(key, x0, eps, cfg: PGDConfig):
    """The starting point of the module docstring (clipped, but for ``normal``)."""
    if cfg.random_start == "none":
        return x0
    if cfg.random_start == "normal":  # TRADES: x + 0.001 N(0, I), not clipped before the first step
        return x0 + cfg.start_radius * jax.random.normal(key, x0.shape, x0.dtype)
    dim = x0[0].size
    if cfg.random_start == "box":
        r = eps if cfg.start_radius is None else _per_example(cfg.start_radius, x0)
        x = x0 + jax.random.uniform(key, x0.shape, x0.dtype, -1.0, 1.0) * r
    else:
        k1, k2 = jax.random.split(key)
        u = jax.random.normal(k1, x0.shape, x0.dtype)
        u = u / (l2_norm(u) + GRAD_EPS)
        if cfg.random_start == "sphere":
            x = x0 + eps * u
        else:  # uniform in the ball: radius eps * U^(1/dim)
            radius = jax.random.uniform(k2, (x0.shape[0],) + (1,) * (x0.ndim - 1), x0.dtype) ** (1.0 / dim)
            x = x0 + eps * radius * u
    if cfg.clip is not None:
        x = jnp.clip(x, cfg.clip[0], cfg.clip[1])
    return x


def _succeeded(logits, y, targeted):
    pred = jnp.argmax(logits, axis=1)
    return pred == y if targeted else pred != y


def _single_run(logits_fn: Callable, x0, y, eps_b, key, cfg: PGDConfig):
    """One PGD run; returns (x_adv, loss at x_adv)."""
    a = eps_b * cfg.step_size if cfg.relative_step else jnp.full_like(eps_b, cfg.step_size)
    expand = (-1,) + (1,) * (x0.ndim - 1)

    def losses(x):
        return per_example_loss(logits_fn(x), y, cfg.loss, cfg.targeted)

    def loss_and_grad(x):
        per, vjp = jax.vjp(losses, x)
        (g,) = vjp(jnp.ones_like(per))  # per-example gradients: examples are independent
        return per, g

    zero_key = jax.random.fold_in(key, ZERO_GRAD_SALT) if cfg.zero_grad == "random" else None

    def body(i, carry):
        x, best_x, best_loss = carry
        loss_now, g = loss_and_grad(x)
        if cfg.use_best:  # the iterate before this step competes (the start included)
            better = loss_now > best_loss
            best_x = jnp.where(better.reshape(expand), x, best_x)
            best_loss = jnp.where(better, loss_now, best_loss)
        if zero_key is None:
            moved = step(x, g, a, cfg.norm)
        else:  # TRADES's L2 step: g / ||g|| exactly; a zero gradient replaced by a normal draw
            n = l2_norm(g)
            draw = jax.random.normal(jax.random.fold_in(zero_key, i), g.shape, g.dtype)
            moved = x + a * jnp.where(n > 0, g / jnp.where(n > 0, n, 1.0), draw)
        x = project(moved, x0, eps_b, cfg.norm, cfg.projection, cfg.clip)
        return x, best_x, best_loss

    x_start = random_start(key, x0, eps_b, cfg)
    init = (x_start, x_start, jnp.full(x0.shape[:1], -jnp.inf, jnp.promote_types(x0.dtype, jnp.float32)))
    unroll = cfg.steps <= UNROLL_MAX_STEPS if cfg.unroll is None else bool(cfg.unroll)
    x, best_x, best_loss = jax.lax.fori_loop(0, cfg.steps, body, init, unroll=unroll)
    if not cfg.use_best:
        return x
    final_loss = losses(x)  # the final iterate competes too
    better = final_loss > best_loss
    return jnp.where(better.reshape(expand), x, best_x)


def pgd_with_logits(logits_fn: Callable, x, y, eps, cfg: PGDConfig, key=None):
    """Runs PGD; returns ``(x_adv, logits at x_adv)`` (the logits come from the final check, so a
    caller needs no extra forward pass)."""
    x = jnp.asarray(x)
    eps_b = _per_example(eps, x)
    if key is None:
        if cfg.random_start != "none" or cfg.restarts > 1:
            raise ValueError("a random start or restarts need a PRNG key")
        key = jax.random.PRNGKey(0)
    keys = jax.random.split(key, cfg.restarts)
    expand = (-1,) + (1,) * (x.ndim - 1)
    best_x = _single_run(logits_fn, x, y, eps_b, keys[0], cfg)
    best_logits = logits_fn(best_x)
    if cfg.restarts == 1:  # (a loss function's y need not be labels: no success to check)
        return best_x, best_logits
    done = _succeeded(best_logits, y, cfg.targeted)
    for r in range(1, cfg.restarts):
        x_r = _single_run(logits_fn, x, y, eps_b, keys[r], cfg)
        logits_r = logits_fn(x_r)
        take = jnp.logical_not(done)  # keep the first restart that succeeds; else the latest
        best_x = jnp.where(take.reshape(expand), x_r, best_x)
        best_logits = jnp.where(take[:, None], logits_r, best_logits)
        done = jnp.logical_or(done, _succeeded(logits_r, y, cfg.targeted))
    return best_x, best_logits


def pgd(logits_fn: Callable, x, y, eps, cfg: PGDConfig, key=None):
    """Runs PGD; returns ``(x_adv, success)``, ``success`` (N,) bool: misclassified (untargeted) or
    classified as the target (targeted) at ``x_adv``.

    ``logits_fn`` maps a batch of inputs to logits (inference mode); ``y`` holds true labels
    (untargeted) or targets (targeted); ``eps`` is a scalar or an (N,) array. ``key`` is needed for
    random starts and restarts. Wrap in ``jax.jit`` (with ``cfg`` static) to compile.
    """
    x_adv, logits = pgd_with_logits(logits_fn, x, y, eps, cfg, key)
    return x_adv, _succeeded(logits, jnp.asarray(y), cfg.targeted)
