"""Adversarial training (Madry et al. 2018, "Towards deep learning models resistant to adversarial
attacks"; the Madry lab's ``robustness`` library, ``robustness/train.py`` and ``attacker.py``).

``loss = CE_smooth(f_train(x_adv), y) + weight_decay * L2 + regularizer_weight * R(x)``, where

- ``x_adv = PGD(f_eval, x, y, eps * m(step))`` is the attack of the ``robustness`` library's
  ``Attacker`` (:func:`attack_config`), run with the model in **inference mode** (BatchNorm running
  statistics, nothing updated) and no gradient to the parameters; ``m(step) = min(1, step / W)`` warms
  the radius up over ``eps_warmup_steps = W`` steps (the library's ``custom_eps_multiplier``; 0: no
  warm-up);
- ``f_train(x_adv)`` is one training-mode forward pass: the loss's BatchNorm batch statistics, and the
  running statistics updated once per step;
- ``R(x)``, when ``regularizer`` names ``'harmonizer'`` or ``'pag'``, is that objective's extra term on
  the **clean** input (the library's ``regularizer(model, inp, target)``): the harmonizer's
  ``lambda * alignment`` or PAG's ``weight * (1 - cos)``, from the same ``objective`` block's keys
  (its cross-entropy and weight decay are not counted twice); its forward pass's BatchNorm statistics
  are discarded.

The attack (``objective.adversarial``): ``constraint`` ``'l2'`` (steps ``x + a g / (||g|| + 1e-10)``,
projection ``renorm``: the perturbation's norm capped at eps as ``torch.renorm(p=2, dim=0,
maxnorm=eps)`` does; random start on the sphere of radius eps) or ``'linf'`` (steps ``x + a sign(g)``,
projection to the eps box; random start uniform in the box), then clipped to [0, 1]; ``steps`` steps
of ``step_size`` (absolute, the library's ``attack_lr``); ``random_start``; ``use_best`` (the iterate of
highest attack loss, the start and the final one included; the library's default); the attack's loss
``attack_loss`` (``'ce'``, the library's, or ``'margin'``: its ``custom_adv_loss``). It is the project's
PGD (:func:`advalign_jax.attacks.pgd.pgd`), compiled into the training step. Per-step metrics:
``accuracy`` and ``adversarial_accuracy`` (the training accuracy at ``x_adv``, the library's train
``prec1``), ``clean_accuracy`` (inference mode at ``x``), ``ce``, ``eps``. With ``augment_padding`` (the objective
block's) each batch is first cropped and flipped (:func:`augmented`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from advalign_jax.attacks.pgd import PGDConfig, pgd
from advalign_jax.errors import ConfigError
from advalign_jax.losses.pag_augment import make_crop_flip
from advalign_jax.training import objectives
from advalign_jax.training.objectives import pag
from advalign_jax.training.objectives.ce import accuracy, l2_term, smoothed_cross_entropy

CONSTRAINTS = ("l2", "linf")
ATTACK_LOSSES = ("ce", "margin")
REGULARIZERS = ("", "harmonizer", "pag")


def _positive(block, key: str, what: str = "objective.adversarial") -> float:
    value = float(block[key])
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what}.{key} must be a positive finite number, got {block[key]}")
    return value


def attack_config(a) -> tuple:
    """``(PGDConfig, eps)`` of an ``objective.adversarial`` block (the module docstring), checked: a
    non-positive or non-finite eps or step, an unknown constraint or attack loss is one line naming
    the key."""
    if a.constraint not in CONSTRAINTS:
        raise ConfigError(f"objective.adversarial.constraint must be one of {', '.join(CONSTRAINTS)}, "
                          f"got {a.constraint!r}")
    if a.attack_loss not in ATTACK_LOSSES:
        raise ConfigError(f"objective.adversarial.attack_loss must be one of {', '.join(ATTACK_LOSSES)}, "
                          f"got {a.attack_loss!r}")
    eps = _positive(a, "eps")
    step = _positive(a, "step_size")
    if int(a.steps) < 1:
        raise ConfigError(f"objective.adversarial.steps must be at least 1, got {a.steps}")
    if int(a.eps_warmup_steps) < 0:
        raise ConfigError(f"objective.adversarial.eps_warmup_steps must be 0 or more, got {a.eps_warmup_steps}")
    l2 = a.constraint == "l2"
    start = ("sphere" if l2 else "box") if a.random_start else "none"
    cfg = PGDConfig(norm=a.constraint, steps=int(a.steps), step_size=step, relative_step=False,
                    projection="renorm" if l2 else "ball", random_start=start, use_best=bool(a.use_best),
                    loss=a.attack_loss, clip=(0.0, 1.0))
    return cfg, eps


def augmented(x, key, cfg):
    """The batch after the objective block's crop (padding ``augment_padding``, fill ``augment_fill``) and
    horizontal flip, one draw per image (``per_example_augment``) or per batch; the batch itself for
    ``augment_padding=0``. The attack and the loss both see the augmented images, as a data loader's
    augmentation gives them (RandomCrop(32, padding=4) and RandomHorizontalFlip in the reference recipes)."""
    if not cfg.augment_padding:
        return x
    return make_crop_flip(int(cfg.augment_padding), float(cfg.augment_fill), bool(cfg.per_example_augment))(key, x)


def eps_multiplier(step, warmup_steps: int):
    """``min(1, step / warmup_steps)``; 1 without a warm-up."""
    if not warmup_steps:
        return 1.0
    return jnp.minimum(1.0, jnp.asarray(step) / float(warmup_steps))


def adversarial_examples(model, variables, x, y, key, cfg: PGDConfig, eps):
    """PGD on the model in inference mode; the parameters get no gradient through the attack."""
    frozen = jax.lax.stop_gradient(variables)
    x_adv, _ = pgd(lambda z: model.apply(frozen, z), x, y, eps, cfg, key=key)
    return jax.lax.stop_gradient(x_adv)


def regularizer_term(name: str, model, params, model_state, batch, rng, cfg, context):
    """``(term, metrics)``: the extra term of the objective ``name`` on the clean batch (its loss less
    its cross-entropy and weight decay), or ``(0, {})`` for ``''``."""
    if not name:
        return jnp.float32(0.0), {}
    if name not in REGULARIZERS:
        raise ConfigError(f"objective.adversarial.regularizer must be one of 'harmonizer', 'pag' or '', got {name!r}")
    other = objectives.get(name)
    args = (model, params, model_state, batch, rng, cfg) + ((context,) if context is not None else ())
    total, (_, metrics) = other.loss(*args)
    term = total - metrics["ce"] - cfg.weight_decay * metrics.get("l2", 0.0)
    return term, {f"regularizer/{k}": v for k, v in metrics.items() if k not in ("loss", "ce", "l2", "accuracy")}


def validate(config, model) -> None:  # pylint: disable=unused-argument
    """The ``objective.adversarial`` block checked before anything is written."""
    a = config.objective.adversarial
    attack_config(a)
    if a.regularizer not in REGULARIZERS:
        raise ConfigError(f"objective.adversarial.regularizer must be one of 'harmonizer', 'pag' or '', "
                          f"got {a.regularizer!r}")
    w = float(a.regularizer_weight)
    if not (math.isfinite(w) and w >= 0):
        raise ConfigError(f"objective.adversarial.regularizer_weight must be a finite number >= 0, got {w}")


def prepare(config, train_input):
    """The regularizer's per-run constants (PAG's targets), when it has any."""
    a = config.objective.adversarial
    if a.regularizer == "pag":
        return pag.prepare(config, train_input)
    return {}


def loss(model, params, model_state, batch, rng, cfg, context=None):
    a = cfg.adversarial
    attack, eps = attack_config(a)
    k_attack, k_drop, k_reg, k_aug = jax.random.split(rng, 4)
    variables = {"params": params, **model_state}
    x, y = augmented(batch["image"], k_aug, cfg), batch["label"]
    radius = eps * eps_multiplier(batch["step"], int(a.eps_warmup_steps))
    x_adv = adversarial_examples(model, variables, x, y, k_attack, attack, radius)
    logits, new_state = model.apply_train(variables, x_adv, rng=k_drop)
    ce = jnp.mean(smoothed_cross_entropy(logits, y, model.num_classes, cfg.label_smoothing))
    wd = l2_term(params, tuple(cfg.decay_exclude)) if cfg.weight_decay else jnp.float32(0.0)
    reg, reg_metrics = regularizer_term(a.regularizer, model, params, model_state, batch, k_reg, cfg, context or None)
    total = ce + cfg.weight_decay * wd + float(a.regularizer_weight) * reg
    clean_logits = model.apply(jax.lax.stop_gradient(variables), x)
    adv_acc = accuracy(logits, y)
    metrics = {"loss": total, "ce": ce, "l2": wd, "accuracy": adv_acc, "adversarial_accuracy": adv_acc,
               "clean_accuracy": accuracy(clean_logits, y), "eps": radius, **reg_metrics}
    if a.regularizer:
        metrics["regularizer"] = reg
    return total, (new_state, metrics)
