"""The smallest attack that flips a decision: the reference protocol and a generic search, vectorised.

**Reference protocol** (the adversarial-alignment study, Linsley, Feng et al. 2023, checked against its
published notebook, serre-lab/Adversarial-Alignment
``adversarial_alignment/scripts/Adversarial_Alignment_PyTorch.ipynb``), per image, with a deterministic
attack ``A(x, eps)``:

1. images the model already misclassifies are skipped (``correct=False``);
2. attack at ``gate_eps`` (10): not fooled -> no finite tolerance (``fooled=False``);
3. attack at ``split_eps`` (1): fooled -> bisect on ``[low, split_eps]`` = [0.001, 1] with stopping
   width 0.01, else on ``[split_eps, gate_eps]`` = [1, 10] with width 0.1;
4. bisection: ``while r - l >= width: m = l + (r - l) / 2``; attack at ``m``; fooled -> ``r = m`` (and
   the attack found at ``m`` is kept), else ``l = m`` (7 steps in either branch);
5. the reported eps is the final upper bound ``r``; the perturbation is the one found at ``r`` (the
   attack at ``split_eps`` or at ``gate_eps`` when no bisection step succeeded).

"Fooled" means ``argmax(model(x_adv)) != label``. Every image follows the same fixed number of
attacks (masks keep finished images unchanged), so a batch is one compiled function with per-image
bounds. Results are identical to running the protocol one image at a time (the tests check this).

**Generic search** (:func:`doubling_search`), for a tighter bound around any attack: start at
``eps0``, double until fooled (at most ``max_doublings`` times), then bisect ``steps`` times between
the last radius that failed and the first that succeeded; the smallest successful radius and its
attack are returned. This is the wrapper AttackBench uses around fixed-radius attacks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from advalign_jax.attacks.pgd import PGDConfig, pgd_with_logits


@dataclasses.dataclass(frozen=True)
class ReferenceSearch:
    gate_eps: float = 10.0
    split_eps: float = 1.0
    low: float = 0.001
    low_width: float = 0.01
    high_width: float = 0.1

    def __post_init__(self):
        if not 0 < self.low < self.split_eps < self.gate_eps:
            raise ValueError(f"need 0 < low < split_eps < gate_eps, got {self.low}, {self.split_eps}, "
                             f"{self.gate_eps}")
        if self.low_width <= 0 or self.high_width <= 0:
            raise ValueError("bisection widths must be positive")

    @property
    def bisection_steps(self) -> int:
        """Upper bound on the bisection steps of either branch (7 for the reference values)."""
        def n(width, span):
            k = 0
            while span >= width:
                span /= 2.0
                k += 1
            return k
        return max(n(self.low_width, self.split_eps - self.low), n(self.high_width, self.gate_eps - self.split_eps))


# The attack of the study: untargeted L2 PGD on the true-label cross-entropy, no random start,
# 3 steps of 0.5, rescaled onto the sphere of radius eps, clipped to [0, 1].
REFERENCE_ATTACK = PGDConfig(norm="l2", steps=3, step_size=0.5, projection="sphere", random_start="none")


def _select(mask, a, b):
    return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)


def reference_search(logits_fn: Callable, x, y, attack: PGDConfig = REFERENCE_ATTACK,
                     search: ReferenceSearch = ReferenceSearch(), key=None) -> dict:
    """The reference minimal-eps protocol for a batch (module docstring).

    Returns a dict of per-image arrays: ``clean_pred``, ``correct`` (clean prediction right),
    ``fooled`` (an attack within ``gate_eps`` flips it), ``eps`` (the upper bound r; ``gate_eps``
    where not fooled), ``x_adv`` (the attack at r; the gate attack where not fooled), ``pred``
    (the adversarial class at ``x_adv``).
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    n = x.shape[0]
    if key is None:
        key = jax.random.PRNGKey(0)
    keys = jax.random.split(key, 2 + search.bisection_steps)

    def run(eps, k):
        x_adv, logits = pgd_with_logits(logits_fn, x, y, eps, attack, key=k)
        pred = jnp.argmax(logits, axis=1)
        return x_adv, pred, pred != y

    clean_pred = jnp.argmax(logits_fn(x), axis=1)
    correct = clean_pred == y
    x_gate, pred_gate, fooled_gate = run(jnp.full((n,), search.gate_eps, jnp.float32), keys[0])
    x_split, pred_split, fooled_split = run(jnp.full((n,), search.split_eps, jnp.float32), keys[1])
    lo = jnp.where(fooled_split, search.low, search.split_eps).astype(jnp.float32)
    hi = jnp.where(fooled_split, search.split_eps, search.gate_eps).astype(jnp.float32)
    width = jnp.where(fooled_split, search.low_width, search.high_width).astype(jnp.float32)
    x_best = _select(fooled_split, x_split, x_gate)
    pred = jnp.where(fooled_split, pred_split, pred_gate)

    def body(i, carry):
        lo, hi, x_best, pred = carry
        active = (hi - lo) >= width
        mid = lo + (hi - lo) / 2
        x_mid, pred_mid, fooled_mid = run(mid, jax.random.fold_in(keys[2], i))
        down = jnp.logical_and(active, fooled_mid)
        up = jnp.logical_and(active, jnp.logical_not(fooled_mid))
        return (jnp.where(up, mid, lo), jnp.where(down, mid, hi), _select(down, x_mid, x_best),
                jnp.where(down, pred_mid, pred))

    lo, hi, x_best, pred = jax.lax.fori_loop(0, search.bisection_steps, body, (lo, hi, x_best, pred))
    return {"clean_pred": clean_pred, "correct": correct, "fooled": fooled_gate, "eps": hi,
            "x_adv": x_best, "pred": pred}


def doubling_search(logits_fn: Callable, x, y, attack: PGDConfig, eps0: float = 0.25,
                    max_doublings: int = 8, steps: int = 10, key=None) -> dict:
    """Generic minimal-radius search around any attack (module docstring), per image, batched.

    Returns ``clean_pred``, ``correct``, ``fooled`` (some radius up to ``eps0 * 2**max_doublings``
    succeeded), ``eps`` (the smallest successful radius found; inf where none), ``eps_lower`` (the
    largest radius that failed; 0 if the first succeeded), ``x_adv`` (the attack at ``eps``; the
    input where none succeeded) and ``pred``. Targeted attacks count success as
    reaching the target ``y``.
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    n = x.shape[0]
    if key is None:
        key = jax.random.PRNGKey(0)

    def run(eps, k):
        x_adv, logits = pgd_with_logits(logits_fn, x, y, eps, attack, key=k)
        pred = jnp.argmax(logits, axis=1)
        return x_adv, pred, (pred == y if attack.targeted else pred != y)

    clean_logits = logits_fn(x)
    clean_pred = jnp.argmax(clean_logits, axis=1)
    correct = clean_pred != y if attack.targeted else clean_pred == y

    def grow(i, carry):
        lo, hi, found, x_best, pred = carry
        eps = jnp.where(found, hi, eps0 * (2.0 ** i)).astype(jnp.float32)
        x_adv, pred_now, ok_now = run(eps, jax.random.fold_in(key, i))
        ok = jnp.logical_and(jnp.logical_not(found), ok_now)
        failed = jnp.logical_and(jnp.logical_not(found), jnp.logical_not(ok_now))
        return (jnp.where(failed, eps, lo), jnp.where(ok, eps, hi), jnp.logical_or(found, ok),
                _select(ok, x_adv, x_best), jnp.where(ok, pred_now, pred))

    init = (jnp.zeros((n,), jnp.float32), jnp.full((n,), jnp.inf, jnp.float32), jnp.zeros((n,), bool), x,
            clean_pred)
    lo, hi, found, x_best, pred = jax.lax.fori_loop(0, max_doublings + 1, grow, init)

    def bisect(i, carry):
        lo, hi, x_best, pred = carry
        mid = jnp.where(found, (lo + hi) / 2, 1.0)
        x_adv, pred_now, ok_now = run(mid, jax.random.fold_in(key, 1000 + i))
        ok = jnp.logical_and(found, ok_now)
        bad = jnp.logical_and(found, jnp.logical_not(ok_now))
        return (jnp.where(bad, mid, lo), jnp.where(ok, mid, hi), _select(ok, x_adv, x_best),
                jnp.where(ok, pred_now, pred))

    lo, hi, x_best, pred = jax.lax.fori_loop(0, steps, bisect, (lo, hi, x_best, pred))
    return {"clean_pred": clean_pred, "correct": correct, "fooled": found, "eps": hi, "eps_lower": lo,
            "x_adv": x_best, "pred": pred}


def attacks_per_image(search: ReferenceSearch = ReferenceSearch()) -> int:
    """Attacks the reference protocol runs per image (2 + bisection steps = 9)."""
    return 2 + search.bisection_steps


def forward_equivalents_per_image(attack: PGDConfig = REFERENCE_ATTACK,
                                  search: ReferenceSearch = ReferenceSearch(),
                                  backward_cost: float = 2.0) -> float:
    """Model passes per image counted in forwards (a backward ~ 2 forwards): each attack is
    ``steps`` forward+backward passes plus one forward to check it; plus the clean forward.
    About 91 for the reference (9 x (3 x 3 + 1) + 1)."""
    per_attack = attack.steps * (1.0 + backward_cost) + 1.0
    return attacks_per_image(search) * per_attack + 1.0

