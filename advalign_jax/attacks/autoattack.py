"""AutoAttack: the standard, plus and rand ensembles as cascades on the surviving points, and its checks.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks" (ICML 2020), as its authors' code runs it (``autoattack/autoattack.py`` of fra31/auto-attack,
``run_standard_evaluation`` and ``set_version``). The attacks are
:mod:`~advalign_jax.attacks.apgd`, :mod:`~advalign_jax.attacks.fab` and
:mod:`~advalign_jax.attacks.square`.

**Versions** (:func:`version_stages`), each a sequence of stages:

- ``standard``: APGD-CE (100 iterations, 1 restart), APGD-T (targeted DLR, 9 targets x 100
  iterations), FAB-T (9 targets x 100 iterations), Square (5,000 queries): the number RobustBench
  reports;
- ``plus``: APGD-CE and APGD-DLR with 5 restarts each, untargeted FAB with 5 restarts, Square
  (5,000 queries), APGD-T and FAB-T (9 targets each);
- ``rand``, for randomised models: APGD-CE and APGD-DLR with Expectation over Transformation over 20
  draws of the model (``eot_iter=20``), 1 restart.

With C classes the targeted stages use ``min(9, C - 1)`` targets (:func:`fit_to_classes`); the DLR
losses need 3 classes (targeted: 4).

**The cascade** (:func:`autoattack`): a point counts as robust when the model classifies it correctly
and no stage breaks it; each stage runs only on the points still robust after the previous ones, and
the robust accuracy after every stage is recorded. Each stage compacts those survivors
(:func:`on_survivors`): they are gathered, in batch order, at the front of the batch and attacked in
chunks of ``chunk`` examples; chunks holding no survivor are skipped. So a stage costs what its
survivors cost (rounded up to a chunk), not the whole batch, and since every example's result is
independent of its batch mates (its random draws come from its index) the results are those of
attacking the whole batch with the others masked.

**Checks** (:func:`run_checks` and the functions it names; each returns a message, or None): the
authors' checks, and two signs of gradient masking:

- ``randomized``: five forward passes of the same batch differ (normalised logits by more than 1e-4
  in L2, or a different accuracy): the model looks randomised; use the ``rand`` version (the authors'
  ``check_randomized``; skipped for ``rand``);
- ``probabilities``: the outputs are non-negative, at most 1 and sum to 1: probabilities, not logits
  (the authors' ``check_range_output``);
- ``input_range``: inputs outside the pixel box the attacks clip to;
- ``n_classes``: more targets asked for than the model has other classes (the authors'
  ``check_n_classes``; the stages then use ``C - 1``);
- ``zero_gradient``: points whose input gradient of the cross-entropy is exactly zero at the clean
  point (the authors check the first gradient of their DLR runs; ``check_zero_gradients``);
- ``square_gain``: the black-box Square lowers the robust accuracy that the gradient-based stages
  before it left by more than 0.2 points (the authors' ``check_square_sr``, measured just before and
  after Square);
- ``small_perturbation``: a stage after the first breaks a point with a perturbation smaller than half
  the radius, which the first stage, run to the full radius, missed (added here: on a model without
  masked gradients APGD finds such points).

The authors' ``check_dynamic`` (autograd calls inside the forward pass of a PyTorch model) has no
counterpart for a pure JAX function and is not run.

Random draws: stage ``s`` draws from ``fold_in(key, s)`` and each example from its index within it
(the authors seed every attack with the same fixed seed and draw per batch). Everything except the
checks that call the model several times is traceable: ``jax.jit`` compiles a whole cascade.

Checked (``tests/attacks/test_autoattack.py``): the versions against the authors' ``set_version``; the
standard cascade against the authors' four attacks as torchattacks 3.5.1 ports them, run as a cascade
on the same float64 model with our random draws fed to them, on a model where every stage breaks
points: the same stage breaks the same points; a gradient-masking model (a linear model on quantised
inputs) on which the gradient-based stages break nothing, Square breaks points and the checks fire.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.attacks.apgd import CLEAN_DRAW, L2, LINF, APGDConfig, apgd
from advalign_jax.attacks.apgd_losses import ce_loss
from advalign_jax.attacks.fab import FABConfig, fab
from advalign_jax.attacks.square import SquareConfig, square

VERSIONS = ("standard", "plus", "rand")
LOG = logging.getLogger("advalign_jax.autoattack")
SQUARE_GAIN = 0.002  # the authors' threshold: Square lowering the robust accuracy by more than 0.2%
SMALL_FRACTION = 0.5  # small_perturbation: a later stage's perturbation below half the radius


# ----------------------------------------------------------------------------------------------------
# Versions and stages
# ----------------------------------------------------------------------------------------------------


def version_stages(version: str = "standard", norm: str = LINF, n_iter: int = 100, n_target_classes: int = 9,
                   n_queries: int = 5000, restarts: int = 5, eot_iter: int = 20, fab_iter: Optional[int] = None,
                   clip=(0.0, 1.0)) -> tuple:
    """The stages ``((name, config), ...)`` of AutoAttack's ``version`` (module docstring).

    ``n_iter``: APGD's iterations; ``fab_iter``: FAB's (default ``n_iter``); ``n_target_classes``:
    APGD-T's and FAB-T's targets; ``n_queries``: Square's budget; ``restarts``: the ``plus`` version's
    restarts of APGD-CE, APGD-DLR and FAB; ``eot_iter``: the ``rand`` version's draws per step."""
    if version not in VERSIONS:
        raise ValueError(f"AutoAttack version must be one of {VERSIONS}, got {version!r}")
    if norm not in (L2, LINF):
        raise ValueError(f"AutoAttack norm must be 'l2' or 'linf', got {norm!r}")
    clip = None if clip is None else tuple(clip)
    fab_iter = n_iter if fab_iter is None else fab_iter

    def apgd_cfg(loss, restarts_=1, eot=1):
        return APGDConfig(norm=norm, n_iter=n_iter, n_restarts=restarts_, loss=loss,
                          n_target_classes=n_target_classes, eot_iter=eot, clip=clip)

    def fab_cfg(targeted, restarts_=1):
        return FABConfig(norm=norm, n_iter=fab_iter, n_restarts=restarts_, targeted=targeted,
                         n_target_classes=n_target_classes, clip=clip)

    square_cfg = SquareConfig(norm=norm, n_queries=n_queries, clip=clip)
    if version == "standard":
        return (("apgd-ce", apgd_cfg("ce")), ("apgd-t", apgd_cfg("dlr-targeted")), ("fab-t", fab_cfg(True)),
                ("square", square_cfg))
    if version == "plus":
        return (("apgd-ce", apgd_cfg("ce", restarts)), ("apgd-dlr", apgd_cfg("dlr", restarts)),
                ("fab", fab_cfg(False, restarts)), ("square", square_cfg), ("apgd-t", apgd_cfg("dlr-targeted")),
                ("fab-t", fab_cfg(True)))
    return (("apgd-ce", apgd_cfg("ce", eot=eot_iter)), ("apgd-dlr", apgd_cfg("dlr", eot=eot_iter)))


def stage_kind(cfg) -> str:
    """``'apgd'``, ``'fab'`` or ``'square'``."""
    if isinstance(cfg, APGDConfig):
        return "apgd"
    if isinstance(cfg, FABConfig):
        return "fab"
    if isinstance(cfg, SquareConfig):
        return "square"
    raise ValueError(f"not an attack config: {cfg!r}")


def targets_asked(cfg) -> int:
    """Target classes a stage asks for (0 for untargeted stages)."""
    if isinstance(cfg, APGDConfig) and cfg.targeted:
        return cfg.n_target_classes
    if isinstance(cfg, FABConfig) and cfg.targeted:
        return cfg.n_target_classes
    return 0


def fit_to_classes(cfg, num_classes: int):
    """The stage on a C-class model: ``min(n_target_classes, C - 1)`` targets; ValueError where the
    loss cannot be computed (DLR: 3 classes, targeted DLR: 4, any: 2)."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, the model has {num_classes}")
    if isinstance(cfg, APGDConfig):
        if cfg.loss == "dlr" and num_classes < 3:
            raise ValueError(f"the DLR loss needs at least 3 classes, the model has {num_classes}")
        if cfg.targeted and num_classes < 4:
            raise ValueError(f"APGD-T (targeted DLR) needs at least 4 classes, the model has {num_classes}")
    if targets_asked(cfg) > num_classes - 1:
        return dataclasses.replace(cfg, n_target_classes=num_classes - 1)
    return cfg


def run_stage(logits_fn: Callable, x, y, eps, cfg, key, index=None, mask=None, model_key=None):
    """One attack of any kind on ``x``: ``(x_adv, success)`` (see :func:`~advalign_jax.attacks.apgd.apgd`,
    :func:`~advalign_jax.attacks.fab.fab`, :func:`~advalign_jax.attacks.square.square`).
    ``model_key``: a randomised model ``logits_fn(x, key)`` (APGD stages only)."""
    kind = stage_kind(cfg)
    if kind == "apgd":
        return apgd(logits_fn, x, y, eps, cfg, key=key, index=index, mask=mask, model_key=model_key)
    if model_key is not None:
        raise ValueError(f"a randomised model can be attacked by APGD only (the rand version), not {kind}")
    if kind == "fab":
        return fab(logits_fn, x, y, eps, cfg, key=key, index=index, mask=mask)
    return square(logits_fn, x, y, eps, cfg, key=key, index=index, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Survivors
# ----------------------------------------------------------------------------------------------------


def on_survivors(attack: Callable, x, y, index, eps, active, chunk: Optional[int] = None, sharding=None):
    """Runs ``attack(x, y, index, eps, mask) -> (x_adv, success)`` on the ``active`` examples only,
    gathered at the front of the batch (in batch order) and attacked ``chunk`` at a time; chunks
    without an active example are skipped. Returns ``(x_adv, success, chunks_run)``: what the attack
    returns for the active examples; inactive ones come back unchanged with success False. ``eps``: (N,). ``sharding``: a sharding each chunk is
    constrained to (the data-parallel one of a mesh), so chunks stay spread over the devices."""
    n = x.shape[0]
    chunk = n if chunk is None else max(1, min(int(chunk), n))
    n_chunks = -(-n // chunk)
    size = n_chunks * chunk
    order = jnp.argsort(jnp.logical_not(active), stable=True)

    def gathered(a):
        a = jnp.take(a, order, axis=0)
        if size > n:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], size - n, axis=0)])
        return a

    xs, ys, idx, es = (gathered(a) for a in (x, y, index, eps))
    act = jnp.concatenate([jnp.take(active, order), jnp.zeros(size - n, bool)])
    n_active = jnp.sum(active.astype(jnp.int32))

    def body(c, carry):
        out_x, out_ok, runs = carry
        start = c * chunk

        def run(_):
            def piece(a):
                a = jax.lax.dynamic_slice_in_dim(a, start, chunk)
                return a if sharding is None else jax.lax.with_sharding_constraint(a, sharding)

            mask = piece(act)
            xa, ok = attack(piece(xs), piece(ys), piece(idx), piece(es), mask)
            return (jax.lax.dynamic_update_slice_in_dim(out_x, xa.astype(out_x.dtype), start, 0),
                    jax.lax.dynamic_update_slice_in_dim(out_ok, ok & mask, start, 0), runs + 1)

        return jax.lax.cond(start < n_active, run, lambda _: carry, None)

    out_x, out_ok, runs = jax.lax.fori_loop(0, n_chunks, body, (xs, jnp.zeros(size, bool), jnp.asarray(0)))
    back = jnp.argsort(order)
    x_adv = jnp.take(out_x[:n], back, axis=0)
    success = jnp.take(out_ok[:n], back) & active
    x_adv = jnp.where(active.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, x)
    return x_adv, success, runs


def autoattack(logits_fn: Callable, x, y, eps, stages: Sequence = None, key=None, index=None, mask=None,
               chunk: Optional[int] = None, model_key=None) -> dict:
    """Runs the cascade ``stages`` (default :func:`version_stages` ``('standard', 'linf')``) on a batch.

    Returns per-example arrays: ``x_adv`` (the point of the stage that broke the example; the input
    where none did), ``stage`` (that stage's position, -1 if none), ``robust`` (correct clean and not
    broken), ``robust_after`` (S, N): robust after each stage, and ``clean_correct``. ``key``: the
    stages' random draws (stage s uses ``fold_in(key, s)``); ``index`` (N,): each example's id for
    them; ``mask`` (N,): the examples to evaluate (others count as not robust); ``chunk``: survivors
    attacked per chunk (:func:`on_survivors`; default the whole batch); ``model_key``: a randomised
    model (``rand``). Stage configs are fitted to the model's classes (:func:`fit_to_classes`)."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    n = x.shape[0]
    stages = version_stages() if stages is None else tuple(stages)
    key = jax.random.PRNGKey(0) if key is None else key
    index = jnp.arange(n) if index is None else jnp.asarray(index)
    mask = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    eps_n = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (n,))
    clean = logits_fn(x) if model_key is None else logits_fn(x, jax.random.fold_in(model_key, CLEAN_DRAW))
    correct = mask & (jnp.argmax(clean, axis=1) == y)
    robust, x_adv, broken_by, after = correct, x, jnp.full((n,), -1, jnp.int32), []
    for s, (_, cfg) in enumerate(stages):
        cfg = fit_to_classes(cfg, clean.shape[1])
        k = jax.random.fold_in(key, s)
        mk = None if model_key is None else jax.random.fold_in(model_key, s)

        def attack(xx, yy, ii, ee, mm, cfg=cfg, k=k, mk=mk):
            return run_stage(logits_fn, xx, yy, ee, cfg, k, ii, mm, mk)

        xs, ok, _ = on_survivors(attack, x, y, index, eps_n, robust, chunk)
        x_adv = jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), xs, x_adv)
        broken_by = jnp.where(ok, s, broken_by)
        robust = robust & ~ok
        after.append(robust)
    return dict(x_adv=x_adv, stage=broken_by, robust=robust, robust_after=jnp.stack(after), clean_correct=correct)


# ----------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------


def _normalised(z):
    z = np.asarray(z, np.float64)
    return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-10)


def check_randomized(logits_fn: Callable, x, y, n: int = 5, alpha: float = 1e-4) -> Optional[str]:
    """``n`` forward passes of ``x``: a message if their accuracies or normalised logits differ (by
    more than ``alpha`` in L2), as the authors' ``check_randomized``."""
    outs = [np.asarray(logits_fn(x)) for _ in range(n)]
    correct = [int(np.sum(np.argmax(o, axis=1) == np.asarray(y))) for o in outs]
    diff = max(float(np.max(np.linalg.norm(_normalised(a) - _normalised(b), axis=1)))
               for i, a in enumerate(outs) for b in outs[i + 1:])
    if len(set(correct)) > 1 or diff > alpha:
        return (f"two forward passes of the same inputs differ (normalised logits by up to {diff:.3g}; "
                f"correct: {sorted(set(correct))}): the model looks randomised; evaluate it with the rand version")
    return None


def check_probabilities(logits, alpha: float = 1e-5) -> Optional[str]:
    """A message if the outputs look like probabilities (in [0, 1], rows summing to 1)."""
    z = np.asarray(logits, np.float64)
    if z.max() < 1.0 + alpha and z.min() > -alpha and np.all(np.abs(z.sum(-1) - 1.0) < alpha):
        return ("the model's outputs look like probabilities (in [0, 1], summing to 1): the attacks' losses "
                "expect logits")
    return None


def check_input_range(x, clip) -> Optional[str]:
    """A message if inputs lie outside the pixel box ``clip`` the attacks keep them in."""
    if clip is None or len(clip) == 0:
        return None
    lo, hi = float(np.min(x)), float(np.max(x))
    if lo < clip[0] or hi > clip[1]:
        return (f"inputs range over [{lo:.4g}, {hi:.4g}], outside the box [{clip[0]:g}, {clip[1]:g}] the attacks "
                "clip to: scale the data or set clip")
    return None


def check_n_classes(num_classes: int, stages: Sequence) -> Optional[str]:
    """A message if a targeted stage asks for more targets than the model has other classes."""
    over = [(name, targets_asked(cfg)) for name, cfg in stages if targets_asked(cfg) > num_classes - 1]
    if over:
        asked = ", ".join(f"{name} {t}" for name, t in over)
        return (f"more target classes asked for ({asked}) than the model has other classes ({num_classes - 1}); "
                f"those stages use {num_classes - 1}")
    return None


def zero_gradients(logits_fn: Callable, x, y):
    """(N,) bool: the input gradient of the cross-entropy is exactly zero (traceable)."""
    g = jax.grad(lambda z: jnp.sum(ce_loss(logits_fn(z), y)))(x)
    return jnp.all(g.reshape(g.shape[0], -1) == 0, axis=1)


def check_zero_gradients(n_zero: int, n: int) -> Optional[str]:
    """A message if some points have a zero input gradient (count from :func:`zero_gradients`)."""
    if n_zero > 0:
        return (f"{n_zero} of {n} points have an input gradient of exactly zero: gradient-based attacks cannot move "
                "them, so their robust accuracy may be overestimated (gradient masking)")
    return None


def check_square_gain(after: dict, alpha: float = SQUARE_GAIN) -> Optional[str]:
    """A message if the Square stage lowered the robust accuracy by more than ``alpha``; ``after``:
    stage name -> robust accuracy after it, in cascade order (a ``clean`` entry first is allowed)."""
    names = list(after)
    if "square" not in names or names.index("square") == 0:
        return None
    before = after[names[names.index("square") - 1]]
    gain = before - after["square"]
    if gain > alpha:
        return (f"the black-box Square attack lowered the robust accuracy by {100 * gain:.2f} points after the "
                "gradient-based attacks: a sign of gradient masking; the evaluation may be unreliable (consider "
                "more Square queries and restarts, or an adaptive attack)")
    return None


def check_small_perturbation(stage, size, eps: float, names: Sequence[str],
                             fraction: float = SMALL_FRACTION) -> Optional[str]:
    """A message if stages after the first broke points with perturbations below ``fraction * eps``;
    ``stage`` (N,): the stage that broke each point (-1 none), ``size`` (N,): its perturbation norm."""
    stage = np.asarray(stage)
    small = (stage > 0) & (np.asarray(size) < fraction * eps)
    if small.any():
        by = ", ".join(f"{names[s]} {int(np.sum(small & (stage == s)))}" for s in sorted(set(stage[small].tolist())))
        return (f"{int(small.sum())} points that {names[0]} missed were broken at less than {fraction:g} x eps ({by}): "
                "the first attack should have found them (gradient masking?)")
    return None


def run_checks(logits_fn: Callable, x, y, stages: Sequence, clip=(0.0, 1.0), version: str = "standard") -> dict:
    """The checks made before the attacks, on a batch: ``randomized`` (not for ``rand``),
    ``probabilities``, ``input_range``, ``n_classes``; ``{name: message}`` for those that fire."""
    logits = np.asarray(logits_fn(x))
    found = {"randomized": check_randomized(logits_fn, x, y) if version != "rand" else None,
             "probabilities": check_probabilities(logits),
             "input_range": check_input_range(np.asarray(x), clip),
             "n_classes": check_n_classes(logits.shape[1], stages)}
    return {k: v for k, v in found.items() if v}


def warn(found: dict, where: str = "") -> None:
    """Logs each fired check as a warning."""
    for name, message in found.items():
        LOG.warning("AutoAttack check %s%s: %s", name, f" ({where})" if where else "", message)
