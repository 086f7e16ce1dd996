"""Robust models as image generators: the input-space manipulations, as pure functions of a model.

Every manipulation is the project's PGD (:mod:`advalign_jax.attacks.pgd`) with the MadryLab
``robustness`` library's L2 semantics (``robustness/attacker.py``, ``robustness/attack_steps.py``;
recipes: ``docs/example_usage/input_space_manipulation.rst`` and the MadryLab/robustness_applications and
robust_representations notebooks): the step ``x <- x + a g / (||g||_2 + 1e-10)``, then
``x0 + renorm(x - x0, eps)`` (``torch.renorm``'s projection) and a clip to [0, 1]; no random start; the
model in inference mode. No other attack code: each function below only chooses the loss and the start.

- :func:`generate`: class-conditional generation (Santurkar et al., "Image Synthesis with a Single
  (Robust) Classifier", NeurIPS 2019): from a seed, the targeted attack towards class ``c``, descending
  ``CE(f(x), c)`` (ImageNet scale: eps 40, step 1, 60 iterations; CIFAR: eps 30, step 0.5, 60); the
  library's ``use_best`` (the iterate of lowest loss) by default.
- :func:`class_gaussians` and :func:`sample_seeds`: the seeds, ``x ~ N(mu_c, Sigma_c + 1e-4 I)`` fitted
  per class on the training images downsampled by ``grain`` (block means), clamped to [0, 1] and
  upsampled by block repetition (grain 4 at ImageNet scale, 1 at CIFAR scale).
- :func:`match`: representation matching (Engstrom et al., "Adversarial Robustness as a Prior for
  Learned Representations", 2019): minimise ``||rep(x) - rep_t||_2 / ||rep_t||_2`` from a seed; with a
  noise seed ``clamp(randn / 20 + 0.5, 0, 1)`` (:func:`noise_seeds`) this is representation inversion
  (eps 1000, step 1, up to 10,000 iterations, ``use_best=False``); from another training image it builds
  the robust and non-robust datasets (:mod:`advalign_jax.synthesis.construct`).
- :func:`interpolate`: inverts the blends ``(1 - a) rep(x_a) + a rep(x_b)`` from the image blends.
- :func:`visualize`: feature visualisation, ascending ``rep(x)[j]`` (eps 1000, step 1, 200 iterations).

``rep`` is a function ``images -> (N, D)`` (:mod:`advalign_jax.synthesis.representation`: a layer of a
model, the penultimate features read through :func:`advalign_jax.models.base.fake_relu` by default).
All functions are pure, batched over their leading axis, and compose with ``jax.jit`` (the recipe
static) and ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.attacks.pgd import L2, PGDConfig, pgd_with_logits

COVARIANCE_JITTER = 1e-4  # Sigma_c + 1e-4 I (the generation notebook's regulariser)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One manipulation's L2 budget: the radius around the seed, the normalised step, the iterations,
    and whether the best iterate (lowest loss) is returned instead of the last."""

    eps: float
    step_size: float
    steps: int
    use_best: bool = False

    def __post_init__(self):
        if not (np.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be positive, got {self.eps}")
        if not (np.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size must be positive, got {self.step_size}")
        if int(self.steps) < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    def pgd(self, **kwargs) -> PGDConfig:
        """The ``robustness`` library's L2 attack with this budget."""
        return PGDConfig(norm=L2, steps=int(self.steps), step_size=float(self.step_size), projection="renorm",
                         random_start="none", use_best=bool(self.use_best), clip=(0.0, 1.0), **kwargs)


def generate(logits_fn: Callable, seeds, classes, recipe: Recipe):
    """Class-conditional generation: targeted L2 PGD from ``seeds`` towards ``classes`` (N,), descending
    ``CE(logits_fn(x), c)``. Returns ``(images, logits at the images)``."""
    return pgd_with_logits(logits_fn, seeds, jnp.asarray(classes), recipe.eps, recipe.pgd(targeted=True, loss="ce"))


def matching_loss(rep, target):
    """``||rep - target||_2 / ||target||_2`` per example (the ``robustness`` inversion loss), (N,)."""
    rep = rep.reshape(rep.shape[0], -1)
    target = target.reshape(target.shape[0], -1)
    sq = jnp.sum((rep - target) ** 2, axis=1)
    # the norm's gradient taken as 0 where rep == target (as PyTorch's norm backward), not 0 / 0
    dist = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return dist / jnp.linalg.norm(target, axis=1)


def match(rep_fn: Callable, target_rep, seeds, recipe: Recipe):
    """Representation matching: from ``seeds``, L2 PGD descending :func:`matching_loss` to ``target_rep``
    (N, D). Returns ``(images, loss at the images)``."""
    cfg = recipe.pgd(loss=lambda rep, t: -matching_loss(rep, t))  # PGD ascends: the negated loss
    x, rep = pgd_with_logits(rep_fn, seeds, jnp.asarray(target_rep), recipe.eps, cfg)
    return x, matching_loss(rep, jnp.asarray(target_rep))


def interpolate(rep_fn: Callable, xa, xb, alphas, recipe: Recipe):
    """For each pair ``(x_a, x_b)`` and each ``a`` of ``alphas`` (K,): the image whose representation
    is ``(1 - a) rep(x_a) + a rep(x_b)``, matched from ``(1 - a) x_a + a x_b``. Returns
    ``(images (N, K, ...), losses (N, K))``."""
    alphas = jnp.asarray(alphas, jnp.float32)
    ra, rb = rep_fn(xa), rep_fn(xb)
    n, k = xa.shape[0], alphas.shape[0]
    a_img = alphas.reshape((1, k) + (1,) * (xa.ndim - 1))
    seeds = ((1 - a_img) * xa[:, None] + a_img * xb[:, None]).reshape((n * k,) + xa.shape[1:])
    a_rep = alphas.reshape(1, k, 1)
    targets = ((1 - a_rep) * ra[:, None] + a_rep * rb[:, None]).reshape(n * k, -1)
    x, loss = match(rep_fn, targets, seeds, recipe)
    return x.reshape((n, k) + xa.shape[1:]), loss.reshape(n, k)


def visualize(rep_fn: Callable, seeds, units, recipe: Recipe):
    """Feature visualisation: L2 PGD ascending ``rep(x)[:, j]`` for each seed's unit ``j`` (N,).
    Returns ``(images, the unit's value at the images)``."""
    units = jnp.asarray(units, jnp.int32)
    cfg = recipe.pgd(loss=lambda rep, j: jnp.take_along_axis(rep.reshape(rep.shape[0], -1), j[:, None], axis=1)[:, 0])
    x, rep = pgd_with_logits(rep_fn, seeds, units, recipe.eps, cfg)
    return x, jnp.take_along_axis(rep.reshape(rep.shape[0], -1), units[:, None], axis=1)[:, 0]


def noise_seeds(key, shape, dtype=jnp.float32):
    """``clamp(randn / 20 + 0.5, 0, 1)``: the inversion and visualisation noise seeds."""
    return jnp.clip(jax.random.normal(key, shape, dtype) / 20.0 + 0.5, 0.0, 1.0)


# ---- the class-conditional seeds ------------------------------------------------------------------------


def downsample(images: np.ndarray, grain: int) -> np.ndarray:
    """Block means over ``grain x grain`` pixels (sides cropped to multiples of ``grain``)."""
    n, h, w, c = images.shape
    h, w = h // grain * grain, w // grain * grain
    x = np.asarray(images[:, :h, :w], np.float64).reshape(n, h // grain, grain, w // grain, grain, c)
    return x.mean(axis=(2, 4))


def upsample(images, grain: int, shape):
    """Block repetition by ``grain``, padded at the bottom/right by edge repetition to ``shape`` (H, W)."""
    x = jnp.repeat(jnp.repeat(images, grain, axis=1), grain, axis=2)
    ph, pw = shape[0] - x.shape[1], shape[1] - x.shape[2]
    return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else x


@dataclasses.dataclass(frozen=True)
class ClassGaussians:
    """For each class of ``classes``: the mean ``mu[k]`` (D,) and a Cholesky factor ``chol[k]`` (D, D)
    of ``Sigma_c + 1e-4 I`` of its images downsampled by ``grain`` (flattened, D = h w C), and the
    images' shape."""

    classes: np.ndarray
    mu: np.ndarray
    chol: np.ndarray
    grain: int
    image_shape: tuple
    counts: np.ndarray


def class_gaussians(images: np.ndarray, labels: np.ndarray, classes, grain: int) -> ClassGaussians:
    """Fits ``N(mu_c, Sigma_c)`` for each class of ``classes`` on its downsampled images (``numpy.cov``,
    ``ddof=1``), adds ``1e-4 I`` and factors it. A class with fewer than two images is an error."""
    if grain < 1:
        raise ValueError(f"grain must be at least 1, got {grain}")
    classes = np.asarray(sorted(set(int(c) for c in classes)), np.int32)
    small = downsample(images, grain)
    flat = small.reshape(len(small), -1)
    labels = np.asarray(labels)
    counts = np.array([int((labels == c).sum()) for c in classes])
    if (counts < 2).any():
        k = int(np.flatnonzero(counts < 2)[0])
        raise ValueError(f"class {int(classes[k])} has {int(counts[k])} training image(s): its Gaussian needs at "
                         f"least 2")
    mus, chols = [], []
    for c in classes:
        xc = flat[labels == c]
        mus.append(xc.mean(axis=0))
        cov = np.cov(xc, rowvar=False) + COVARIANCE_JITTER * np.eye(flat.shape[1])
        chols.append(np.linalg.cholesky(cov))
    return ClassGaussians(classes, np.stack(mus).astype(np.float32), np.stack(chols).astype(np.float32), grain,
                          tuple(images.shape[1:]), counts)


def sample_seeds(key, gaussians: ClassGaussians, classes):
    """One seed per entry of ``classes`` (N,; each one of ``gaussians.classes``): ``mu_c + L_c z``
    (``z ~ N(0, I)``), clamped to [0, 1], reshaped to the downsampled image and upsampled to the image
    shape."""
    rows = jnp.searchsorted(jnp.asarray(gaussians.classes), jnp.asarray(classes, jnp.int32))
    mu, chol = jnp.asarray(gaussians.mu)[rows], jnp.asarray(gaussians.chol)[rows]
    z = jax.random.normal(key, mu.shape, mu.dtype)
    x = jnp.clip(mu + jnp.einsum("nij,nj->ni", chol, z), 0.0, 1.0)
    h, w, ch = gaussians.image_shape
    g = gaussians.grain
    x = x.reshape(-1, h // g, w // g, ch)
    return upsample(x, g, (h, w))
