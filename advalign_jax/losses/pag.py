"""Perceptually aligned gradients (PAG) training loss (Ganz, Kawar, Elad, ICML 2023), as pure functions.

Paper: "Do Perceptually Aligned Gradients Imply Robustness?"; reference code: the official
royg27/PAG-ROB, ``TRAIN_CIFAR10.py`` (PyTorch 1.13). ``tests/references/torch_pag_reference.py``
re-implements that loss and ``tests/losses/test_pag_loss.py`` compares it with this module (value and
parameter gradient).

For images x (N, ...), labels y, target classes c_{n,k} (N, K) and target gradients g(x_n, c) ::

    a_{n,k}  = d/dx_n  [s * log softmax(f(x))_{n, c_{n,k}}]          (class_input_gradients)
    cos_{n,k} = sum((a / max(||a||, eps)) * (g / max(||g||, eps)))    (cosine_similarity, eps 1e-8)
    align    = 1 - mean_{n,k} cos_{n,k}                 reduction='mean'  (the official code)
             = C * (1 - mean_{n,k} cos_{n,k})           reduction='sum'   (the paper's sum over classes)
    L        = mean_n CE(f(x_n), y_n) + weight * align                    (pag_loss)

The loss is differentiated w.r.t. the parameters through ``a`` (double backprop), in one of two
orders (``differentiation``; both give the same loss and gradient, ``tests/losses/test_pag_loss.py``):

- ``'reverse_over_reverse'``: ``a`` is a VJP of the forward pass and the trainer's reverse-mode
  gradient goes back through that VJP;
- ``'reverse_over_forward'``: with ``u_{n,k}`` the one-hot cotangent that gives ``a_{n,k} = J^T u``
  (``J = d log softmax(f(x)) / dx``) and ``v = d(weight * align) / da`` held fixed, the alignment
  term's parameter gradient is ``d/dtheta sum_k <v_k, J^T u_k> = d/dtheta sum_k <u_k, J v_k>``: the
  reverse-mode gradient of K forward-mode directional derivatives of the same forward pass along
  ``v``. The loss returned is ``CE + weight * align + (S - stop_gradient(S))`` with
  ``S = sum_k <u_k, J v_k>``: the same value, and the same derivative w.r.t. anything the forward pass
  depends on (parameters, BatchNorm state, images). The target gradients are treated as constants
  (they are: the objective stops their gradient). One linearisation of the forward pass
  (``jax.linearize``) serves the K VJPs (its transpose) and the K JVPs.

What ``weight`` (lambda) means:

- ``reduction='mean'``: the official code's term. It computes ``10 * (1 - mean cos)`` and multiplies by
  ``pag_coeff``, so the official run is ``weight = 10 * pag_coeff`` (15 for ResNet-18, 30 for ViT
  and 20 during the ViT's first 50 epochs): :meth:`PAGConfig.official`.
- ``reduction='sum'``: the paper's ``lambda * sum_{y_t=1..C} (1 - mean_n cos(., g(x, y_t)))``. With all
  classes as targets (K = C) this is exactly ``C * (1 - mean cos)``; with a random subset of K classes
  per image it is the unbiased estimate ``(C / K) * mean_n sum_{k<K} (1 - cos_{n,k})``, which is again
  ``C * (1 - mean cos)``. Hence ``weight_sum = weight_mean / C``: on CIFAR-10 (C = 10) the official
  hard-coded 10 makes ``pag_coeff`` exactly the paper's lambda. The toy experiment uses 'sum' with
  weight 5.

The cosine's eps (``torch.nn.CosineSimilarity``, eps 1e-8): each norm is clamped separately, the value
is ``sum((a / max(||a||, eps)) * (b / max(||b||, eps)))`` (PyTorch's implementation since pytorch#31378,
2022; the official environment pins 1.13.0), not ``a.b / max(||a|| ||b||, eps)`` and not
``||a|| + eps``. PyTorch 2.x clamps under ``no_grad``, so its gradient treats the clamped norm as if it
were ``||a||`` (``d||a||/da = a / ||a||``, 0 at a = 0); :func:`cosine_similarity` reproduces both the
value and that gradient (checked against the installed torch; the 1.13 gradient may differ, and only
where a norm is below eps). A zero gradient or a zero target (OI: the representative image itself)
gives cos = 0.

Gradient scale ``s`` (``grad_scale``): the official code differentiates ``-CE`` averaged over the N*K
replicated rows, so its input-gradients are ``1 / (N K)`` times the per-pair ones ('mean', the
default); 'unit' uses the per-pair gradients. The cosine is scale invariant, so the two differ only
where a norm falls below eps (e.g. a very confident true class); 'mean' is the faithful choice.

Forward-pass semantics (``semantics``):

- ``'shared'`` (the default): ONE training-mode forward pass of the batch gives the logits for the
  cross-entropy and, through one VJP with K cotangents (vmapped), all N*K input-gradients; BatchNorm
  statistics are updated once per step.
- ``'replicated'`` (the official code): the cross-entropy uses its own forward pass; the alignment term
  uses a second training-mode forward pass over the batch replicated K times (row ``n*K + k`` is image
  n, target class ``c_{n,k}``), and the input-gradient is that of the **sum** over all rows of the log
  probabilities, so BatchNorm couples the rows and its running statistics are updated twice per step
  (first from the N CE images, then from the N*K replicated ones).

The two coincide exactly for models without batch-coupling layers (or in inference mode); with
training-mode BatchNorm they differ only through the batch statistics (``tests/losses/test_pag_loss.py``).

Augmentation: :func:`pag_loss` applies an ``augment(key, images)`` inside the differentiated function,
so the input-gradients are taken w.r.t. the un-augmented images, as the official code does; the
official crop-and-flip is :mod:`advalign_jax.losses.pag_augment` (:func:`make_crop_flip`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from advalign_jax.errors import ConfigError
from advalign_jax.losses.pag_augment import crop_flip, make_crop_flip, sample_crop_flip

# The public names of the PAG loss, its augmentation included.
__all__ = ["DIFFERENTIATIONS", "EPS", "GRAD_SCALES", "OFFICIAL_FACTOR", "PAGConfig", "REDUCTIONS", "SEMANTICS",
           "alignment_term", "class_input_gradients", "cosine_similarity", "crop_flip", "cross_entropy",
           "gather_targets", "grad_scale_value", "linearized_input_gradients", "make_crop_flip", "pag_loss",
           "pair_cosines", "replicate", "replicated_class_input_gradients", "reverse_over_forward_term",
           "sample_crop_flip", "select_classes"]

EPS = 1e-8
REDUCTIONS = ("mean", "sum")
SEMANTICS = ("shared", "replicated")
GRAD_SCALES = ("mean", "unit")
DIFFERENTIATIONS = ("reverse_over_reverse", "reverse_over_forward")
OFFICIAL_FACTOR = 10.0  # the hard-coded factor of the official PAG term


@dataclasses.dataclass(frozen=True)
class PAGConfig:
    """Everything that defines the PAG loss (see the module docstring).

    ``num_targets``: K target classes per image (None = all C classes, the CIFAR-10 configs).
    ``weight``: lambda, whose meaning depends on ``reduction``. The default reproduces the official
    ResNet-18 run's effective weight (10 * 1.5) with the official 'mean' reduction.
    """

    weight: float = OFFICIAL_FACTOR * 1.5
    reduction: str = "mean"
    num_targets: Optional[int] = None
    eps: float = EPS
    semantics: str = "shared"
    grad_scale: str = "mean"
    differentiation: str = "reverse_over_reverse"

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"PAG reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.semantics not in SEMANTICS:
            raise ConfigError(f"PAG semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        if self.differentiation not in DIFFERENTIATIONS:
            raise ConfigError(f"PAG differentiation must be one of {DIFFERENTIATIONS}, got {self.differentiation!r}")
        if self.grad_scale not in GRAD_SCALES:
            raise ConfigError(f"PAG grad_scale must be one of {GRAD_SCALES}, got {self.grad_scale!r}")
        if self.num_targets is not None and int(self.num_targets) < 1:
            raise ConfigError(f"PAG num_targets must be at least 1 (or None for all classes), "
                              f"got {self.num_targets}")
        if not self.eps > 0:
            raise ConfigError(f"PAG eps must be positive, got {self.eps}")
        if self.weight < 0:
            raise ConfigError(f"PAG weight must be non-negative, got {self.weight}")

    @classmethod
    def official(cls, pag_coeff: float = 1.5, num_targets: Optional[int] = 10) -> "PAGConfig":
        """The official code's loss: ``CE + pag_coeff * 10 * (1 - mean cos)`` on a replicated batch."""
        return cls(weight=OFFICIAL_FACTOR * pag_coeff, reduction="mean", num_targets=num_targets,
                   semantics="replicated", grad_scale="mean")

    @classmethod
    def paper(cls, lam: float, num_targets: Optional[int] = None, semantics: str = "shared") -> "PAGConfig":
        """The paper's ``CE + lambda * sum over classes of (1 - mean cos)``."""
        return cls(weight=lam, reduction="sum", num_targets=num_targets, semantics=semantics)

    def targets_per_image(self, num_classes: int) -> int:
        k = num_classes if self.num_targets is None else int(self.num_targets)
        if k > num_classes:
            raise ConfigError(f"PAG num_targets ({k}) exceeds the number of classes ({num_classes})")
        return k


# ----------------------------------------------------------------------------------------------------
# Target classes
# ----------------------------------------------------------------------------------------------------


def select_classes(key, num_images: int, num_classes: int, num_targets: Optional[int] = None):
    """Target classes per image, (N, K) int32.

    K = C (``num_targets`` None or C) without a key: every class in order ``0..C-1``. Otherwise each
    image gets K distinct classes drawn uniformly without replacement, in random order (the official
    ``torch.randperm(C)[:K]`` per image; the draws themselves differ across frameworks).
    """
    k = num_classes if num_targets is None else int(num_targets)
    if not 1 <= k <= num_classes:
        raise ConfigError(f"num_targets must be in 1..{num_classes}, got {k}")
    if key is None:
        if k != num_classes:
            raise ValueError("a random key is needed to draw a subset of target classes")
        return jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (num_images, num_classes))
    keys = jax.random.split(key, num_images)
    perm = jax.vmap(lambda kk: jax.random.permutation(kk, num_classes))(keys)
    return perm[:, :k].astype(jnp.int32)


def gather_targets(targets, classes):
    """The target gradients of the selected classes: (N, C, ...) and (N, K) -> (N, K, ...)."""
    idx = classes.reshape(classes.shape + (1,) * (targets.ndim - 2))
    return jnp.take_along_axis(targets, idx, axis=1)


# ----------------------------------------------------------------------------------------------------
# Input-gradients of the log-probabilities
# ----------------------------------------------------------------------------------------------------


def _at_least_f32(a):
    """``a`` in float32, or in its own wider float type (float64 for verification)."""
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _log_softmax_forward(forward):
    def f(x):
        logits, aux = forward(x)
        logits = _at_least_f32(logits)
        return jax.nn.log_softmax(logits), (logits, aux)

    return f


def class_input_gradients(forward: Callable, x, classes, grad_scale=1.0):
    """Input-gradients of the log-probabilities of K classes per image from ONE forward pass.

    ``forward(x) -> (logits, aux)`` (e.g. a training-mode apply returning the new BatchNorm state as
    ``aux``). Returns ``(grads (N, K, *x.shape[1:]), logits, aux)`` with
    ``grads[:, k] = grad_scale * d/dx sum_n log softmax(forward(x))_{n, classes[n, k]}``: one VJP of the
    log-softmax output pulled back with K one-hot cotangents at once (``vmap`` over the cotangents).
    The forward pass runs once; only the backward pass is batched K-fold. With a model whose examples
    are independent (no training-mode BatchNorm), ``grads[n, k]`` is the gradient of image n's own
    log-probability.
    """
    logp, vjp_fn, (logits, aux) = jax.vjp(_log_softmax_forward(forward), x, has_aux=True)
    cot = jax.nn.one_hot(classes, logp.shape[-1], dtype=logp.dtype) * jnp.asarray(grad_scale, logp.dtype)
    (grads,) = jax.vmap(vjp_fn, in_axes=1, out_axes=1)(cot)
    return grads, logits, aux


def replicate(x, k: int):
    """The official replicated batch: each image repeated K times in place, (N*K, ...); row n*K + j
    is image n."""
    return jnp.repeat(x, k, axis=0)


def replicated_class_input_gradients(forward: Callable, x, classes, grad_scale=1.0):
    """The official code's input-gradients: one forward pass over the batch replicated K times.

    Row ``n*K + k`` of ``replicate(x, K)`` is image n with target ``classes[n, k]``; the gradient is that
    of ``grad_scale * sum_rows log softmax(forward(rows))_{row, class}`` w.r.t. the replicated rows (the
    official ``grad(-CE_mean(model(aug(ims)), targets), ims)`` is ``grad_scale = 1 / (N K)``). Training-mode
    BatchNorm sees all N*K rows. Returns ``(grads (N, K, ...), logits (N*K, C), aux)``.
    """
    n, k = classes.shape
    rows = replicate(x, k)
    flat = classes.reshape(-1)

    def objective(xr):
        logp, (logits, aux) = _log_softmax_forward(forward)(xr)
        picked = jnp.take_along_axis(logp, flat[:, None], axis=1)
        return jnp.sum(picked) * grad_scale, (logits, aux)

    grads, (logits, aux) = jax.grad(objective, has_aux=True)(rows)
    return grads.reshape((n, k) + x.shape[1:]), logits, aux


def linearized_input_gradients(forward: Callable, x, cotangents, scale=1.0):
    """One linearisation of ``log softmax(forward(x))`` at ``x`` and the input-gradients it gives.

    ``cotangents``: (N, K, C) (K cotangents, e.g. one-hot rows) or (N, C) (one), multiplied by
    ``scale`` in the log-probabilities' dtype (a float64 model keeps a float64 scale). Returns
    ``(grads, jvp, logits, aux)``: ``grads`` (N, K, *x.shape[1:]) or x's shape, ``J^T u`` for each
    cotangent ``u`` (the transpose of the linearisation, vmapped over K); ``jvp(v)`` the directional
    derivative ``J v`` of the log-probabilities along a tangent of the same layout as ``grads``.
    The forward pass runs once for both directions.
    """
    logp, f_lin, (logits, aux) = jax.linearize(_log_softmax_forward(forward), x, has_aux=True)
    f_t = jax.linear_transpose(f_lin, jax.ShapeDtypeStruct(x.shape, x.dtype))
    cotangents = cotangents.astype(logp.dtype) * jnp.asarray(scale, logp.dtype)
    if cotangents.ndim == 2:
        return f_t(cotangents)[0], f_lin, logits, aux
    grads = jax.vmap(lambda u: f_t(u)[0], in_axes=1, out_axes=1)(cotangents)
    return grads, jax.vmap(f_lin, in_axes=1, out_axes=1), logits, aux


def reverse_over_forward_term(align_fn: Callable, grads, jvp: Callable, cotangents, weight, scale=1.0):
    """``(align, aux, S - stop_gradient(S))`` for :func:`pag_loss`'s ``'reverse_over_forward'`` order.

    ``align, aux = align_fn(grads)`` on the input-gradients held fixed; ``v = weight * d align / d grads``
    (fixed); ``S = scale * sum <cotangents, jvp(v)>`` (the cotangents and scale that gave ``grads``),
    whose derivative w.r.t. anything the forward pass depends on is that of ``weight * align(J^T u)``
    (module docstring). The third output is 0.
    """
    grads = jax.lax.stop_gradient(grads)
    (align, aux), d_align = jax.value_and_grad(align_fn, has_aux=True)(grads)
    v = jax.lax.stop_gradient(weight * d_align)
    tangent = jvp(v)
    s = jnp.sum(cotangents.astype(tangent.dtype) * tangent) * jnp.asarray(scale, tangent.dtype)
    return align, aux, s - jax.lax.stop_gradient(s)


# ----------------------------------------------------------------------------------------------------
# Cosine and the alignment term
# ----------------------------------------------------------------------------------------------------


def _norm(a):
    """||a|| over the last axis with gradient a / ||a|| (0 at a = 0, as torch's vector_norm)."""
    s = jnp.sum(a * a, axis=-1, keepdims=True)
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def _clamped_norm(a, eps):
    """Value ``max(||a||, eps)``; gradient that of ``||a||`` (torch clamps under no_grad)."""
    n = _norm(a)
    return n + jax.lax.stop_gradient(jnp.maximum(n, eps) - n)


def cosine_similarity(a, b, eps: float = EPS):
    """``sum((a / max(||a||, eps)) * (b / max(||b||, eps)))`` over the last axis (torch semantics,
    value and gradient; see the module docstring)."""
    a = _at_least_f32(a)
    b = _at_least_f32(b)
    return jnp.sum((a / _clamped_norm(a, eps)) * (b / _clamped_norm(b, eps)), axis=-1)


def pair_cosines(grads, targets, eps: float = EPS):
    """Cosines of flattened (N, K, ...) input-gradients and target gradients, shape (N, K)."""
    n, k = grads.shape[:2]
    return cosine_similarity(grads.reshape(n, k, -1), targets.reshape(n, k, -1), eps)


def alignment_term(cos, reduction: str = "mean", num_classes: Optional[int] = None):
    """``1 - mean cos`` ('mean', the official code) or ``C * (1 - mean cos)`` ('sum', the paper's sum
    over classes; see the module docstring). ``cos``: (N, K)."""
    mean_term = 1.0 - jnp.mean(cos)
    if reduction == "mean":
        return mean_term
    if reduction == "sum":
        if num_classes is None:
            raise ValueError("reduction='sum' needs num_classes")
        return num_classes * mean_term
    raise ConfigError(f"PAG reduction must be one of {REDUCTIONS}, got {reduction!r}")


def cross_entropy(logits, labels):
    """Mean cross-entropy from logits (``torch.nn.CrossEntropyLoss()``)."""
    logp = jax.nn.log_softmax(_at_least_f32(logits))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1))


def grad_scale_value(cfg: PAGConfig, num_images: int, num_targets: int) -> float:
    return 1.0 / (num_images * num_targets) if cfg.grad_scale == "mean" else 1.0


# ----------------------------------------------------------------------------------------------------
# The full loss
# ----------------------------------------------------------------------------------------------------


def pag_loss(apply_fn: Callable, state: Any, x, labels, targets, cfg: PAGConfig, *, key=None,
             classes=None, augment: Optional[Callable] = None, x_ce=None, weight=None):
    """``CE + weight * alignment`` (module docstring); differentiable w.r.t. whatever ``apply_fn``
    closes over (the parameters), through the input-gradients.

    Arguments:
      apply_fn: ``(state, images) -> (logits, new_state)``, a training-mode forward pass (``state`` is
        the BatchNorm state, ``{}`` for models without one).
      x: (N, ...) the un-augmented images: the gradients are taken w.r.t. these (the frame of the
        targets).
      targets: (N, C, ...) target gradients for every class (the stored layout minus the image),
        constants of the loss.
      key: draws the K-subset of classes (when ``classes`` is None and K < C) and the augmentations.
      classes: optional (N, K) target classes (else :func:`select_classes`).
      augment: optional ``augment(key, images) -> images``, differentiable in the images (e.g.
        :func:`make_crop_flip`); applied inside the differentiated function.
      x_ce: 'replicated' only: images for the cross-entropy's own forward pass (e.g. augmented by the
        input pipeline); default ``augment(x)``. The 'shared' semantics has a single forward pass at
        ``augment(x)`` and rejects ``x_ce``.
      weight: lambda, if not ``cfg.weight`` (e.g. a traced schedule value).

    Returns ``(loss, (new_state, metrics))``.
    """
    n = x.shape[0]
    num_classes = targets.shape[1]
    if targets.shape[0] != n or targets.shape[2:] != x.shape[1:]:
        raise ValueError(f"targets of shape {targets.shape} do not fit images of shape {x.shape}: "
                         f"expected (N, C, *image_shape)")
    k = cfg.targets_per_image(num_classes)
    if key is None and (augment is not None or (classes is None and k < num_classes)):
        raise ValueError("pag_loss needs a key to draw target classes or augmentations")
    k_cls, k_aug1, k_aug2 = jax.random.split(key, 3) if key is not None else (None, None, None)
    if classes is None:
        classes = select_classes(k_cls if k < num_classes else None, n, num_classes, k)
    elif classes.shape != (n, k):
        raise ValueError(f"classes must have shape {(n, k)}, got {classes.shape}")
    if cfg.semantics == "shared" and x_ce is not None:
        raise ValueError("the 'shared' PAG semantics has one forward pass at augment(x); x_ce is only "
                         "for semantics='replicated'")
    selected = gather_targets(targets, classes)
    scale = grad_scale_value(cfg, n, k)
    weight = cfg.weight if weight is None else weight

    def aug(kk, images):
        return images if augment is None else augment(kk, images)

    def align_fn(grads):
        cos = pair_cosines(grads, selected, cfg.eps)
        return alignment_term(cos, cfg.reduction, num_classes), cos

    if cfg.differentiation == "reverse_over_reverse":
        if cfg.semantics == "shared":
            grads, logits, new_state = class_input_gradients(lambda xi: apply_fn(state, aug(k_aug1, xi)), x,
                                                             classes, scale)
        else:
            logits, mid_state = apply_fn(state, aug(k_aug1, x) if x_ce is None else x_ce)
            grads, _, new_state = replicated_class_input_gradients(
                lambda xr: apply_fn(mid_state, aug(k_aug2, xr)), x, classes, scale)
        align, cos = align_fn(grads)
        mixed = 0.0
    else:
        if cfg.semantics == "shared":
            cot = jax.nn.one_hot(classes, num_classes, dtype=jnp.float32)
            grads, jvp, logits, new_state = linearized_input_gradients(
                lambda xi: apply_fn(state, aug(k_aug1, xi)), x, cot, scale)
        else:
            logits, mid_state = apply_fn(state, aug(k_aug1, x) if x_ce is None else x_ce)
            cot_rows = jax.nn.one_hot(classes.reshape(-1), num_classes, dtype=jnp.float32)
            rows_grads, rows_jvp, _, new_state = linearized_input_gradients(
                lambda xr: apply_fn(mid_state, aug(k_aug2, xr)), replicate(x, k), cot_rows, scale)
            grads = rows_grads.reshape((n, k) + x.shape[1:])
            cot = cot_rows.reshape(n, k, num_classes)

            def jvp(v):  # (N, K, ...) tangents of the replicated rows -> (N, K, C)
                return rows_jvp(v.reshape(rows_grads.shape)).reshape(n, k, num_classes)
        align, cos, mixed = reverse_over_forward_term(align_fn, grads, jvp, cot, weight, scale)

    ce = cross_entropy(logits, labels)
    total = ce + weight * align + mixed
    metrics = {
        "loss": ce + weight * align, "ce": ce, "alignment": align, "cos_mean": jnp.mean(cos),
        "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)),
    }
    return total, (new_state, metrics)
