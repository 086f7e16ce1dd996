"""The plain objective: label-smoothed cross-entropy plus an optional L2 term on the weights.

``loss = CE_smooth(logits, y) + weight_decay * sum over decayed parameters of 0.5 * w**2``

Cross-entropy with label smoothing ``s`` over ``C`` classes uses the target ``(1 - s) * onehot + s / C``
(Keras ``CategoricalCrossentropy(label_smoothing=s, from_logits=True)``); the L2 term is
``tf.nn.l2_loss`` summed over the parameters whose names contain none of the excluded substrings
(the harmonization package's loss; its mask is ``objective.decay_exclude``).

Every objective module defines ``loss(model, params, model_state, batch, rng, cfg)`` returning
``(loss, (new_model_state, metrics))``; the trainer differentiates it with respect to ``params``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from advalign_jax.training.optim import decay_mask


def smoothed_cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.0):
    """Per-example cross-entropy with label smoothing, from logits."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) if smoothing else \
        jax.nn.one_hot(labels, num_classes)
    return optax.softmax_cross_entropy(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), targets)


def l2_term(params, exclude) -> jnp.ndarray:
    """``sum 0.5 * w**2`` over the parameters kept by the name mask (``tf.nn.l2_loss`` summed)."""
    mask = decay_mask(params, exclude)
    leaves = [0.5 * jnp.sum(jnp.square(w.astype(jnp.float32)))
              for w, keep in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if keep]
    return sum(leaves) if leaves else jnp.float32(0.0)


def accuracy(logits, labels):
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def loss(model, params, model_state, batch, rng, cfg):
    variables = {"params": params, **model_state}
    logits, new_state = model.apply_train(variables, batch["image"], rng=rng)
    ce = jnp.mean(smoothed_cross_entropy(logits, batch["label"], model.num_classes, cfg.label_smoothing))
    wd = l2_term(params, tuple(cfg.decay_exclude)) if cfg.weight_decay else jnp.float32(0.0)
    total = ce + cfg.weight_decay * wd
    return total, (new_state, {"loss": total, "ce": ce, "l2": wd, "accuracy": accuracy(logits, batch["label"])})
