"""The neural harmonizer objective: cross-entropy + L2 term + lambda x the pyramidal alignment term.

One training-mode forward pass gives the logits **and**, through its VJP, the saliency (the gradient
of the true-class logit w.r.t. the input), so BatchNorm statistics are updated once per step; the
trainer differentiates the whole loss w.r.t. the parameters (double backprop). Terms and constants:
:mod:`advalign_jax.losses.harmonization`. Config (``objective`` block): ``lambda_harmonization``
(1.0 in the package; 2.0 in the lab's training code), ``pyramid_levels`` (5; 6 in the older code),
``saliency`` ('mean' as in the reference), ``label_smoothing`` (0.1), ``weight_decay`` (1e-5) and
``decay_exclude`` (the name mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from advalign_jax.losses import harmonization as H
from advalign_jax.training.objectives.ce import accuracy, l2_term, smoothed_cross_entropy


def loss(model, params, model_state, batch, rng, cfg):
    variables = {"params": params, **model_state}

    def forward(x):
        logits, new_state = model.apply_train(variables, x, rng=rng)
        return logits, new_state

    logits, vjp_fn, new_state = jax.vjp(forward, batch["image"], has_aux=True)
    saliency = H.saliency_from_vjp(vjp_fn, batch["label"], model.num_classes, cfg.saliency)
    align = H.alignment_term(saliency, batch["heatmap"], batch["token"], int(cfg.pyramid_levels))
    ce = jnp.mean(smoothed_cross_entropy(logits, batch["label"], model.num_classes, cfg.label_smoothing))
    wd = l2_term(params, tuple(cfg.decay_exclude)) if cfg.weight_decay else jnp.float32(0.0)
    total = ce + cfg.weight_decay * wd + cfg.lambda_harmonization * align
    metrics = {"loss": total, "ce": ce, "alignment": align, "l2": wd,
               "accuracy": accuracy(logits, batch["label"]), "token_fraction": jnp.mean(batch["token"])}
    return total, (new_state, metrics)
