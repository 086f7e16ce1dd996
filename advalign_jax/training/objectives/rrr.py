"""Right for the right reasons (Ross, Hughes and Doshi-Velez, IJCAI 2017): cross-entropy plus the
squared input-gradient of the log-probabilities outside the human map.

For images x (N, H, W, C), labels y, human maps phi (N, H, W) in [0, 1] and tokens t (N,) (1 where the
image has a map), with ``log p = log_softmax(f(x))`` over K classes:

    g_n   = d/dx_n sum_k log p_k(x_n)                       (N, H, W, C)
    A_n   = 1 - phi_n              (rrr_threshold = 0: the soft mask)
          = [phi_n < rrr_threshold]  (rrr_threshold > 0: the paper's binary "irrelevant" annotation)
    rrr   = mean_n t_n sum_{h,w,c} (A_nhw g_nhwc)^2
    loss  = CE(label smoothing) + weight_decay * sum 0.5 w^2 + lambda_rrr * rrr

This is eq. 1 of the paper (its code: dtak/rrr, ``l2_grads * sum((A * grad(sum log_prob))**2)``) with
means over the batch in place of sums, and the human map's complement as the annotation A. Unlike the
harmonizer's term, it is not invariant to the gradient's scale or offset: any gradient off the map is
penalised, whatever the gradient on the map (docs/demonstration.md compares the two on the shortcut
data). The gradient is the VJP of the same training-mode forward pass that gives the logits, with the
cotangent ``1 - K softmax(f)`` (the derivative of ``sum_k log p_k`` w.r.t. the logits), so BatchNorm
statistics are updated once per step; the trainer differentiates through it (double backprop).
``tests/training/test_rrr.py`` compares the loss and its parameter gradient with a PyTorch
implementation (``torch.autograd.grad(..., create_graph=True)``) in float64.

Config (``objective`` block): ``lambda_rrr``, ``rrr_threshold``, ``label_smoothing``,
``weight_decay``, ``decay_exclude``; the data must give human maps (``data_kind='clickme'``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from advalign_jax.errors import ConfigError
from advalign_jax.training.objectives.ce import accuracy, l2_term, smoothed_cross_entropy


def irrelevance_mask(human_maps, threshold: float = 0.0):
    """``A``: ``1 - phi`` (threshold 0) or ``[phi < threshold]`` (threshold in (0, 1])."""
    if threshold > 0:
        return (human_maps < threshold).astype(human_maps.dtype)
    return 1.0 - human_maps


def log_probability_gradient(vjp_fn, logits):
    """``d/dx sum_k log_softmax(f(x))_k`` from the VJP of the forward pass: the cotangent is
    ``1 - K softmax(f)``."""
    k = logits.shape[-1]
    (grad,) = vjp_fn(1.0 - k * jax.nn.softmax(logits, axis=-1))
    return grad


def right_reasons_term(grad, human_maps, tokens, threshold: float = 0.0):
    """``mean_n t_n sum_{h,w,c} (A_nhw g_nhwc)^2`` for input-gradients (N, H, W, C)."""
    a = irrelevance_mask(human_maps.astype(grad.dtype), threshold)[..., None]
    per_image = jnp.sum(jnp.square(a * grad), axis=(1, 2, 3))
    return jnp.mean(per_image * tokens.astype(grad.dtype))


def validate(config, model) -> None:  # pylint: disable=unused-argument
    """The objective block checked before anything is written."""
    cfg = config.objective
    lam, thr = float(cfg.lambda_rrr), float(cfg.rrr_threshold)
    if not (math.isfinite(lam) and lam >= 0):
        raise ConfigError(f"objective.lambda_rrr must be a finite number >= 0, got {cfg.lambda_rrr}")
    if not 0.0 <= thr <= 1.0:
        raise ConfigError(f"objective.rrr_threshold must be in [0, 1] (0: the soft mask 1 - map), "
                          f"got {cfg.rrr_threshold}")
    if config.get("data_kind", "clickme") != "clickme":
        raise ConfigError(f"objective 'rrr' needs human maps: data_kind must be 'clickme', got {config.data_kind!r}")


def loss(model, params, model_state, batch, rng, cfg):
    variables = {"params": params, **model_state}

    def forward(x):
        return model.apply_train(variables, x, rng=rng)

    logits, vjp_fn, new_state = jax.vjp(forward, batch["image"], has_aux=True)
    grad = log_probability_gradient(vjp_fn, logits)
    rrr = right_reasons_term(grad, batch["heatmap"], batch["token"], float(cfg.rrr_threshold))
    ce = jnp.mean(smoothed_cross_entropy(logits, batch["label"], model.num_classes, cfg.label_smoothing))
    wd = l2_term(params, tuple(cfg.decay_exclude)) if cfg.weight_decay else jnp.float32(0.0)
    total = ce + cfg.weight_decay * wd + cfg.lambda_rrr * rrr
    metrics = {"loss": total, "ce": ce, "rrr": rrr, "l2": wd, "accuracy": accuracy(logits, batch["label"]),
               "token_fraction": jnp.mean(batch["token"])}
    return total, (new_state, metrics)
