"""The PAG objective: cross-entropy + lambda x the cosine gradient-alignment term (double backprop).

Loss and semantics: :mod:`advalign_jax.losses.pag`; target gradients:
:mod:`advalign_jax.losses.pag_targets`. The ``objective`` config block:

- ``pag_weight`` and ``reduction``: ``'mean'`` is the official ``1 - mean cos`` (the official run is
  ``pag_weight = 10 * pag_coeff``: 15 for ResNet-18); ``'sum'`` is the paper's sum over classes
  (the toy experiment: 5);
- ``num_targets``: K target classes per image (0: all C); ``semantics``: ``'shared'`` (one forward
  pass, K cotangents through one VJP; BatchNorm statistics updated once) or ``'replicated'`` (the
  official batch replicated K times on a second forward pass);
- ``target_source``: ``'one_image'``, ``'class_mean'`` (``class_mean_scale``: 0 = automatic),
  ``'nearest_neighbour'`` (``nn_sample_size``: images per class in the sample set, 0 = all) or
  ``'precomputed'`` (``targets_file``: .npy/.npz/.pt or TFRecords, e.g. score-based targets written by
  ``advalign-jax targets``; ``targets_images``: ``'verify'`` trains on the data split and checks that
  the file holds its images in its order, ``'file'`` trains on the file's own images and labels
  (``targets_labels_file``) as the official code does; ``targets_image_range``: ``'0_1'`` or the
  official ``'-1_1'``; :func:`advalign_jax.training.inputs.precomputed_training_set`);
- ``warm_steps`` / ``warm_weight``: a different weight for the first steps (the official ViT recipe);
- ``differentiation``: the order in which the parameter gradient goes through the input-gradients,
  ``'reverse_over_reverse'`` or ``'reverse_over_forward'``; the same loss and gradient
  (:mod:`advalign_jax.losses.pag`, ``docs/benchmarks.md`` "Orders of differentiation" for their cost);
  ``'auto'`` (the default) is :data:`AUTO_DIFFERENTIATION`, the faster of the two as measured;
- ``augment_padding``: a random crop after padding by this many pixels (``augment_fill`` in [0, 1] units; 0.5 is
  the official zero of [-1, 1] images) and a horizontal flip, applied inside the loss so the gradients
  are taken w.r.t. the un-augmented image (0: none, e.g. the toy points); ``per_example_augment``: a
  draw per image (ours), or one draw for the whole batch (the official code; with ``'replicated'``
  the cross-entropy pass and the alignment pass get separate draws, as there).

The official code's behaviour is ``semantics='replicated'`` with ``per_example_augment=False``
(:func:`advalign_jax.training.config_blocks.pag_official_semantics`, the ``*_official`` variants of
``configs/pag_cifar10_*.py``).

``prepare`` builds the per-run constants (class representatives or the NN sample set) once; the
trainer places them on every device and passes them to ``loss`` as ``context``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from advalign_jax.errors import ConfigError
from advalign_jax.losses import pag as P
from advalign_jax.losses import pag_targets as T

SOURCES = ("one_image", "class_mean", "nearest_neighbour", "precomputed")
# 'auto': reverse over forward, 1.3-1.7x faster than reverse over reverse for the CIFAR ResNet-18 step
# at K = 1-10 in both semantics, with the same loss and gradient (docs/benchmarks.md).
AUTO_DIFFERENTIATION = "reverse_over_forward"


def pag_config(cfg) -> P.PAGConfig:
    return P.PAGConfig(weight=float(cfg.pag_weight), reduction=cfg.reduction,
                       num_targets=int(cfg.num_targets) or None, semantics=cfg.semantics,
                       grad_scale=cfg.grad_scale,
                       differentiation=_order(cfg.get("differentiation", "auto")))


def _order(name: str) -> str:
    if name != "auto" and name not in P.DIFFERENTIATIONS:
        raise ConfigError(f"objective.differentiation must be 'auto' or one of {', '.join(P.DIFFERENTIATIONS)}, "
                          f"got {name!r}")
    return AUTO_DIFFERENTIATION if name == "auto" else name


def prepare(config, train_input) -> dict:
    """Class representatives (OI, CM) or the NN sample set, from the training arrays."""
    cfg = config.objective
    if cfg.target_source not in SOURCES:
        raise ConfigError(f"objective.target_source must be one of {', '.join(SOURCES)}, got {cfg.target_source!r}")
    pag_config(cfg)  # validates the loss options before anything runs
    if cfg.target_source == "precomputed":
        return {}
    if not hasattr(train_input, "images"):
        raise ConfigError("PAG training reads in-memory arrays: set data_kind='arrays'")
    images, labels = train_input.images, train_input.labels
    num_classes = int(config.model.options.num_classes)
    if cfg.target_source == "one_image":
        reps, _ = T.one_image_representatives(images, labels, num_classes, seed=int(config.seed))
        return {"representatives": reps}
    if cfg.target_source == "class_mean":
        scale = "auto" if not cfg.class_mean_scale else float(cfg.class_mean_scale)
        return {"representatives": T.class_mean_representatives(images, labels, num_classes, scale=scale)}
    bank, ids = T.nearest_neighbour_bank(images, labels, num_classes, int(cfg.nn_sample_size) or None,
                                         seed=int(config.seed))
    return {"bank": bank, "bank_ids": ids}


def targets_for(batch, context, cfg):
    """(N, C, *image_shape) target gradients for the batch's un-augmented images."""
    x = batch["image"]
    if cfg.target_source == "precomputed":
        return batch["targets"]
    if cfg.target_source in ("one_image", "class_mean"):
        return T.representative_targets(x, context["representatives"])
    targets, _, _ = T.nearest_neighbour(x, batch["index"], context["bank"], context["bank_ids"],
                                        chunk_size=int(cfg.nn_chunk_size))
    return jax.lax.stop_gradient(targets)


def loss(model, params, model_state, batch, rng, cfg, context=None):
    k_drop, k_pag = jax.random.split(rng)

    def apply_fn(state, x):
        return model.apply_train({"params": params, **state}, x, rng=k_drop)

    augment = None
    if cfg.augment_padding:
        augment = P.make_crop_flip(int(cfg.augment_padding), fill=float(cfg.augment_fill),
                                   per_example=bool(cfg.per_example_augment))
    targets = targets_for(batch, context or {}, cfg)
    weight = None
    if cfg.warm_steps:  # a different weight for the first steps (the official ViT: 20 for 50 epochs, then 30)
        weight = jnp.where(batch["step"] < int(cfg.warm_steps), float(cfg.warm_weight), float(cfg.pag_weight))
    total, (new_state, metrics) = P.pag_loss(apply_fn, model_state, batch["image"], batch["label"], targets,
                                             pag_config(cfg), key=k_pag, augment=augment, weight=weight)
    if weight is not None:
        metrics = {**metrics, "pag_weight": weight}
    return total, (new_state, metrics)

