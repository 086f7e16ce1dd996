"""The neural harmonizer objective: cross-entropy + L2 term + lambda x the pyramidal alignment term.

One training-mode forward pass gives the logits **and**, through its VJP, the saliency (the gradient
of the true-class logit w.r.t. the input), so BatchNorm statistics are updated once per step; the
trainer differentiates the whole loss w.r.t. the parameters (double backprop). Terms and constants:
:mod:`advalign_jax.losses.harmonization`. Config (``objective`` block): ``lambda_harmonization``
(1.0 in the package; 2.0 in the lab's training code), ``pyramid_levels`` (5; 6 in the older code),
``saliency`` ('mean' as in the reference; 'absmax' or 'mean_abs': ``reduce_saliency``),
``label_smoothing`` (0.1), ``weight_decay`` (1e-5) and ``decay_exclude`` (the name mask).

The order of differentiation (``differentiation``; ``auto`` and a block without the key mean
:data:`DEFAULT_DIFFERENTIATION`) gives the same loss and gradient (``tests/losses/test_harmonization.py``):

- ``'reverse_over_reverse'``: the saliency is a VJP of the forward pass, and the trainer's gradient
  goes back through it;
- ``'reverse_over_forward'``: with ``u`` the one-hot true-class cotangent (saliency
  ``g = J^T u``, ``J = d logits / dx``) and ``v = lambda * d align / d g`` held fixed, the term's
  parameter gradient is ``d/dtheta <v, J^T u> = d/dtheta <u, J v>``, the reverse-mode gradient of one
  forward-mode directional derivative along ``v``. The loss is ``... + (S - stop_gradient(S))``,
  ``S = <u, J v>``: the same value and the same derivative w.r.t. everything the forward pass depends
  on (the human maps are constants). One linearisation of the forward pass gives the saliency (its
  transpose) and ``J v``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from advalign_jax.errors import ConfigError
from advalign_jax.losses import harmonization as H
from advalign_jax.training.objectives.ce import accuracy, l2_term, smoothed_cross_entropy

DIFFERENTIATIONS = ("reverse_over_reverse", "reverse_over_forward")
# 'auto' (the config default): reverse over reverse, as fast as the other order on the ResNet50V2 step
# (median ratio 0.93 with rounds up to 1.16, docs/benchmarks.md), so the simpler program stays.
DEFAULT_DIFFERENTIATION = "reverse_over_reverse"


def validate(config, model) -> None:  # pylint: disable=unused-argument
    """The objective block checked before anything is written: the saliency reduction, lambda and the
    pyramid depth."""
    cfg = config.objective
    if cfg.saliency not in H.SALIENCY_REDUCTIONS:
        raise ConfigError(f"objective.saliency must be one of {', '.join(H.SALIENCY_REDUCTIONS)}, got {cfg.saliency!r}")
    lam = float(cfg.lambda_harmonization)
    if not (math.isfinite(lam) and lam >= 0):
        raise ConfigError(f"objective.lambda_harmonization must be a finite number >= 0, "
                          f"got {cfg.lambda_harmonization}")
    if int(cfg.pyramid_levels) < 1:
        raise ConfigError(f"objective.pyramid_levels must be at least 1, got {cfg.pyramid_levels}")


def loss(model, params, model_state, batch, rng, cfg):
    variables = {"params": params, **model_state}
    order = cfg.get("differentiation", DEFAULT_DIFFERENTIATION)
    order = DEFAULT_DIFFERENTIATION if order == "auto" else order
    if order not in DIFFERENTIATIONS:
        raise ConfigError(f"objective.differentiation must be 'auto' or one of {', '.join(DIFFERENTIATIONS)}, "
                          f"got {order!r}")
    levels = int(cfg.pyramid_levels)

    def forward(x):
        logits, new_state = model.apply_train(variables, x, rng=rng)
        return logits, new_state

    def align_fn(grad):
        return H.alignment_term(H.reduce_saliency(grad, cfg.saliency), batch["heatmap"], batch["token"], levels)

    if order == "reverse_over_reverse":
        logits, vjp_fn, new_state = jax.vjp(forward, batch["image"], has_aux=True)
        saliency = H.saliency_from_vjp(vjp_fn, batch["label"], model.num_classes, cfg.saliency, logits.dtype)
        align = H.alignment_term(saliency, batch["heatmap"], batch["token"], levels)
        mixed = 0.0
    else:
        x = batch["image"]
        logits, f_lin, new_state = jax.linearize(forward, x, has_aux=True)
        u = jax.nn.one_hot(batch["label"], model.num_classes, dtype=logits.dtype)
        (grad,) = jax.linear_transpose(f_lin, jax.ShapeDtypeStruct(x.shape, x.dtype))(u)
        align, d_align = jax.value_and_grad(align_fn)(jax.lax.stop_gradient(grad))
        v = jax.lax.stop_gradient(cfg.lambda_harmonization * d_align)
        s = jnp.sum(u * f_lin(v))
        mixed = s - jax.lax.stop_gradient(s)

    ce = jnp.mean(smoothed_cross_entropy(logits, batch["label"], model.num_classes, cfg.label_smoothing))
    wd = l2_term(params, tuple(cfg.decay_exclude)) if cfg.weight_decay else jnp.float32(0.0)
    total = ce + cfg.weight_decay * wd + cfg.lambda_harmonization * align
    metrics = {"loss": total, "ce": ce, "alignment": align, "l2": wd,
               "accuracy": accuracy(logits, batch["label"]), "token_fraction": jnp.mean(batch["token"])}
    return total + mixed, (new_state, metrics)
