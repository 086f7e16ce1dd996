"""TRADES (Zhang et al. 2019, "Theoretically principled trade-off between robustness and accuracy";
yaodongyu/TRADES ``trades.py``, ``trades_loss``).

``loss = CE(f(x), y) + beta * (1 / B) * sum_i KL(softmax f(x_i) || softmax f(x_adv_i)) + weight_decay * L2``

with both forward passes in training mode and the clean distribution **not** detached (the gradient
flows through both branches, as in the reference). The inner attack maximises the summed KL to the
clean prediction, the model in **inference mode** (BatchNorm running statistics), the clean
prediction computed once in that mode:

- ``constraint='linf'``: start ``x + 0.001 N(0, I)`` (not clipped), then ``steps`` steps
  ``x + step_size * sign(g)``, each projected to the eps box around ``x`` and clipped to [0, 1];
- ``constraint='l2'``: start ``x + 0.001 N(0, I)``, then ``steps`` normalised-gradient steps of
  ``2 * eps / steps`` (the reference's SGD on the perturbation; a zero gradient is replaced by a normal
  draw, as there), each perturbation clipped so that ``x + delta`` is in [0, 1] and then renormed to norm
  at most eps (``torch.renorm``);

then ``x_adv`` is clipped to [0, 1]. The attack is the project's PGD (:func:`advalign_jax.attacks.pgd.pgd`)
with the KL as its loss. BatchNorm running statistics follow the reference's three training-mode passes
in order (``f(x)`` for the cross-entropy, ``f(x_adv)`` and ``f(x)`` again inside the KL; the values
of the two clean passes are the same, so the loss uses one of them and the third pass only updates the
statistics). Config: the ``objective.adversarial`` block's ``constraint``, ``eps``, ``step_size``,
``steps`` and ``beta`` (TRADES's CIFAR-10 recipe: Linf, 0.031, 0.007, 10, 6.0). Metrics: ``ce``
(clean), ``kl``, ``accuracy`` / ``clean_accuracy`` (training mode at ``x``), ``adversarial_accuracy``
(training mode at ``x_adv``). With ``augment_padding`` (the objective block's) each batch is first cropped
and flipped (:func:`advalign_jax.training.objectives.adversarial.augmented`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from advalign_jax.attacks.pgd import PGDConfig, pgd
from advalign_jax.errors import ConfigError
from advalign_jax.training.objectives.adversarial import CONSTRAINTS, augmented
from advalign_jax.training.objectives.ce import accuracy, l2_term

START_STD = 0.001  # the reference's start: x + 0.001 * N(0, I)


def kl_to(p_clean):
    """The attack's per-example loss ``KL(p_clean || softmax(logits))`` (``torch.nn.KLDivLoss`` on
    ``(log_softmax(logits), p_clean)``, summed over classes)."""
    def kl(logits, _):
        log_q = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
        return jnp.sum(jax.scipy.special.xlogy(p_clean, p_clean) - p_clean * log_q, axis=-1)

    return kl


def attack_config(a, p_clean) -> tuple:
    """``(PGDConfig, eps)`` of TRADES's inner attack for the clean probabilities ``p_clean``; bad values
    are one line naming the key."""
    if a.constraint not in CONSTRAINTS:
        raise ConfigError(f"objective.adversarial.constraint must be one of {', '.join(CONSTRAINTS)}, "
                          f"got {a.constraint!r}")
    for key in ("eps", "step_size"):
        v = float(a[key])
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"objective.adversarial.{key} must be a positive finite number, got {a[key]}")
    if int(a.steps) < 1:
        raise ConfigError(f"objective.adversarial.steps must be at least 1, got {a.steps}")
    eps, steps = float(a.eps), int(a.steps)
    l2 = a.constraint == "l2"
    cfg = PGDConfig(norm=a.constraint, steps=steps, step_size=2.0 * eps / steps if l2 else float(a.step_size),
                    projection="clip_renorm" if l2 else "ball", random_start="normal", start_radius=START_STD,
                    loss=kl_to(p_clean), clip=(0.0, 1.0), zero_grad="random" if l2 else "none")
    return cfg, eps


def validate(config, model) -> None:
    """The config checked against the model before anything is written: ``beta >= 0`` and finite, the
    attack's keys, a model with a distribution over at least 2 classes."""
    a = config.objective.adversarial
    beta = float(a.beta)
    if not (math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"objective.adversarial.beta must be a finite number >= 0, got {a.beta}")
    if model.num_classes < 2:
        raise ConfigError(f"objective 'trades' compares softmax distributions over classes, but model "
                          f"{model.name!r} has {model.num_classes} output(s)")
    attack_config(a, jnp.full((1, model.num_classes), 1.0 / model.num_classes))


def loss(model, params, model_state, batch, rng, cfg, context=None):  # pylint: disable=unused-argument
    a = cfg.adversarial
    k_attack, k_drop = jax.random.split(rng)
    variables = {"params": params, **model_state}
    x, y = augmented(batch["image"], jax.random.fold_in(rng, 2), cfg), batch["label"]
    frozen = jax.lax.stop_gradient(variables)
    p_clean = jax.nn.softmax(model.apply(frozen, x), axis=-1)
    attack, eps = attack_config(a, p_clean)
    x_adv, _ = pgd(lambda z: model.apply(frozen, z), x, y, eps, attack, key=k_attack)
    x_adv = jax.lax.stop_gradient(jnp.clip(x_adv, 0.0, 1.0))
    logits, state_clean = model.apply_train(variables, x, rng=k_drop)
    adv_logits, state_adv = model.apply_train({"params": params, **state_clean}, x_adv, rng=k_drop)
    if state_adv:  # the reference's third pass, f(x) inside the KL: its values are the first pass's
        _, new_state = model.apply_train(jax.lax.stop_gradient({"params": params, **state_adv}), x, rng=k_drop)
    else:
        new_state = state_adv
    n = x.shape[0]
    ce = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[:, None], axis=1)[:, 0])
    p = jax.nn.softmax(logits, axis=-1)
    kl = jnp.sum(jax.scipy.special.xlogy(p, p) - p * jax.nn.log_softmax(adv_logits, axis=-1)) / n
    wd = l2_term(params, tuple(cfg.decay_exclude)) if cfg.weight_decay else jnp.float32(0.0)
    total = ce + float(a.beta) * kl + cfg.weight_decay * wd
    clean_acc = accuracy(logits, y)
    metrics = {"loss": total, "ce": ce, "kl": kl, "l2": wd, "accuracy": clean_acc, "clean_accuracy": clean_acc,
               "adversarial_accuracy": accuracy(adv_logits, y)}
    return total, (new_state, metrics)
