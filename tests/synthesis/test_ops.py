"""The input-space manipulations (advalign_jax.synthesis.ops) against an independent PyTorch float64
version of the robustness library's L2 attack, known optima, and the seed and relabelling rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from advalign_jax.synthesis import construct, ops
from advalign_jax.synthesis.synthesize import frechet_distance


def _torch_l2_attack(loss_fn, x0, eps, step, steps, targeted, use_best):
    """The robustness library's ``Attacker`` with ``L2Step`` (``robustness/attacker.py``,
    ``robustness/attack_steps.py``), written here in PyTorch: ``m = -1`` for a targeted attack; each
    step ``x + m * step * g / (||g|| + 1e-10)``; ``project``: ``x0 + (x - x0).renorm(2, 0, eps)`` then
    ``clamp(0, 1)``; ``use_best``: the iterate of best ``m * loss`` (the start included, then every
    step, then the final iterate)."""
    m = -1.0 if targeted else 1.0
    x = x0.clone()
    best_x, best_loss = None, None

    def replace(loss, x):
        nonlocal best_x, best_loss
        if best_x is None:
            best_x, best_loss = x.clone(), loss.clone()
            return
        better = m * loss > m * best_loss
        best_x[better] = x[better]
        best_loss[better] = loss[better]

    for _ in range(steps):
        x = x.clone().requires_grad_(True)
        loss = loss_fn(x)
        (g,) = torch.autograd.grad((m * loss).sum(), x)
        replace(loss.detach(), x.detach())
        with torch.no_grad():
            n = g.reshape(len(g), -1).norm(dim=1).reshape(-1, *([1] * (g.ndim - 1)))
            x = x + step * g / (n + 1e-10)
            d = (x - x0).renorm(p=2, dim=0, maxnorm=eps)
            x = torch.clamp(x0 + d, 0, 1)
    with torch.no_grad():
        replace(loss_fn(x), x)
    return (best_x if use_best else x).numpy()


@pytest.fixture
def linear():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(48, 5)), rng.normal(size=5)
    x0 = rng.uniform(0.2, 0.8, size=(6, 4, 4, 3))
    return w, b, x0


@pytest.mark.parametrize("use_best", [True, False])
def test_generation_is_the_robustness_librarys_targeted_l2_attack(linear, use_best):
    """A linear-softmax model, float64 on both sides: ``generate`` equals the PyTorch attack step by step."""
    w, b, x0 = linear
    target = np.array([0, 1, 2, 3, 4, 0])
    rec = ops.Recipe(eps=1.5, step_size=0.3, steps=12, use_best=use_best)
    with jax.enable_x64(True):
        logits = lambda x: x.reshape(len(x), -1) @ jnp.asarray(w) + jnp.asarray(b)  # noqa: E731
        ours, _ = ops.generate(logits, jnp.asarray(x0), jnp.asarray(target), rec)
        ours = np.asarray(ours)
    tw, tb, tt = torch.tensor(w), torch.tensor(b), torch.tensor(target)
    ref = _torch_l2_attack(lambda x: torch.nn.functional.cross_entropy(x.reshape(len(x), -1) @ tw + tb, tt,
                                                                       reduction="none"),
                           torch.tensor(x0), 1.5, 0.3, 12, targeted=True, use_best=use_best)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    assert np.abs(ours - x0).max() > 0.05  # it moved


def test_matching_is_the_librarys_inversion_loss_descended(linear):
    """Representation matching with ``||rep - t|| / ||t||`` (float64) equals the PyTorch attack descending it."""
    w, _, x0 = linear
    rng = np.random.default_rng(1)
    a = rng.normal(size=(48, 7))
    target = np.tanh(rng.uniform(0.2, 0.8, size=(6, 48)) @ a)
    rec = ops.Recipe(eps=1000.0, step_size=0.05, steps=15)
    with jax.enable_x64(True):
        rep = lambda x: jnp.tanh(x.reshape(len(x), -1) @ jnp.asarray(a))  # noqa: E731
        ours, loss = ops.match(rep, jnp.asarray(target), jnp.asarray(x0), rec)
        ours = np.asarray(ours)
    ta, tt = torch.tensor(a), torch.tensor(target)
    ref = _torch_l2_attack(lambda x: (torch.tanh(x.reshape(len(x), -1) @ ta) - tt).norm(dim=1) / tt.norm(dim=1),
                           torch.tensor(x0), 1000.0, 0.05, 15, targeted=True, use_best=False)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    want = np.linalg.norm(np.tanh(ref.reshape(6, -1) @ a) - target, axis=1) / np.linalg.norm(target, axis=1)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-9)


def test_inversion_of_a_linear_representation_reaches_its_target():
    """``rep(x) = A x`` with A (8 x 48) of full row rank: the target ``A x*`` (``x*`` inside the box) is
    reachable, so the matching loss goes to 0 (the step anneals by itself: the normalised step overshoots
    at most ``step``, so a small step reaches a small loss)."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(48, 8))
    x_star = rng.uniform(0.3, 0.7, size=(3, 4, 4, 3))
    with jax.enable_x64(True):
        rep = lambda x: x.reshape(len(x), -1) @ jnp.asarray(a)  # noqa: E731
        target = rep(jnp.asarray(x_star))
        seeds = ops.noise_seeds(jax.random.PRNGKey(0), x_star.shape, jnp.float64)
        start = np.asarray(ops.matching_loss(rep(seeds), target))
        _, loss = ops.match(rep, target, seeds, ops.Recipe(eps=1000.0, step_size=0.002, steps=3000))
    assert (start > 0.05).all()
    assert np.asarray(loss).max() < 2e-3


def test_matching_loss_decreases_monotonically_on_a_smooth_network():
    """A tanh network (smooth), a small normalised step: the loss after k steps never increases with k."""
    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(size=(48, 16)) / 4, rng.normal(size=(16, 6)) / 2
    rep = lambda x: jnp.tanh(jnp.tanh(x.reshape(len(x), -1) @ jnp.asarray(w1)) @ jnp.asarray(w2))  # noqa: E731
    with jax.enable_x64(True):
        target = rep(jnp.asarray(rng.uniform(0.2, 0.8, size=(4, 4, 4, 3))))
        seeds = jnp.asarray(rng.uniform(0.2, 0.8, size=(4, 4, 4, 3)))
        losses = [np.asarray(ops.match(rep, target, seeds, ops.Recipe(1000.0, 0.01, k))[1]) for k in range(1, 40, 3)]
    losses = np.stack(losses)
    assert (np.diff(losses, axis=0) <= 1e-12).all()
    assert (losses[-1] < 0.8 * losses[0]).all()


def test_visualisation_raises_the_unit_and_interpolation_ends_at_the_images():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(48, 6)) / 20  # units well inside tanh's range at the seeds
    rep = lambda x: jnp.tanh(x.reshape(len(x), -1) @ jnp.asarray(w))  # noqa: E731
    seeds = jnp.asarray(rng.uniform(0.2, 0.8, size=(4, 4, 4, 3)), jnp.float32)
    units = jnp.array([0, 1, 2, 5])
    x, value = ops.visualize(rep, seeds, units, ops.Recipe(1000.0, 0.1, 20))
    start = np.asarray(rep(seeds))[np.arange(4), np.asarray(units)]
    assert np.abs(start).max() < 0.8
    assert (np.asarray(value) > start + 0.1).all()
    xa, xb = seeds[:2], seeds[2:]
    images, loss = ops.interpolate(rep, xa, xb, (0.0, 0.5, 1.0), ops.Recipe(1000.0, 0.001, 1))
    assert images.shape == (2, 3, 4, 4, 3)
    # at a = 0 and 1 the seed is the image itself: the loss starts at 0 and one small step keeps it tiny
    assert np.asarray(loss)[:, [0, 2]].max() < 5e-3
    np.testing.assert_allclose(np.asarray(images[:, 0]), np.asarray(xa), atol=2e-3)


def test_class_gaussians_fit_mean_and_covariance_and_seeds_follow_them():
    """Mean and ``Sigma + 1e-4 I`` (the covariance written out, not numpy.cov) of block-mean-downsampled
    images; seeds are clamped, upsampled by repetition, and drawn from the right class."""
    rng = np.random.default_rng(5)
    images = np.clip(rng.normal(0.5, 0.1, size=(60, 8, 8, 3)), 0, 1)
    images[30:] = np.clip(images[30:] * 0.3, 0, 1)  # class 1 darker
    labels = np.repeat([0, 1], 30)
    g = ops.class_gaussians(images, labels, (1, 0), grain=2)
    assert list(g.classes) == [0, 1]
    small = images.reshape(60, 4, 2, 4, 2, 3).mean(axis=(2, 4)).reshape(60, -1)
    for k, c in enumerate((0, 1)):
        xc = small[labels == c]
        mu = xc.mean(0)
        cov = (xc - mu).T @ (xc - mu) / (len(xc) - 1) + 1e-4 * np.eye(48)
        np.testing.assert_allclose(g.mu[k], mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g.chol[k].astype(np.float64) @ g.chol[k].T.astype(np.float64), cov, atol=1e-5)
    seeds = np.asarray(ops.sample_seeds(jax.random.PRNGKey(0), g, jnp.array([0] * 200 + [1] * 200)))
    assert seeds.shape == (400, 8, 8, 3) and seeds.min() >= 0 and seeds.max() <= 1
    np.testing.assert_array_equal(seeds[:, ::2, ::2], seeds[:, 1::2, 1::2])  # block repetition
    assert seeds[:200].mean() > seeds[200:].mean() + 0.2
    with pytest.raises(ValueError, match="class 2"):
        ops.class_gaussians(images, labels, (2,), grain=2)


def test_relabelling_and_seed_images():
    y = np.arange(10000) % 10
    np.testing.assert_array_equal(construct.relabel("det", y, 10, 0), (y + 1) % 10)
    np.testing.assert_array_equal(construct.relabel("robust", y, 10, 0), y)
    t = construct.relabel("rand", y, 10, 0)
    assert scipy.stats.chisquare(np.bincount(t, minlength=10)).pvalue > 1e-4  # uniform over the classes
    assert scipy.stats.chisquare(np.bincount((t - y) % 10, minlength=10)).pvalue > 1e-4  # independent of y
    s = construct.seed_images(500, 0)
    assert (s != np.arange(500)).all() and s.min() >= 0 and s.max() < 500
    offsets = (s - np.arange(500)) % 500
    assert len(np.unique(offsets)) > 300  # spread over the other images, not a fixed shift
    np.testing.assert_array_equal(s, construct.seed_images(500, 0))


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
    """Samples of N(mu_a, diag(va)) and N(mu_b, diag(vb)): the distance tends to
    ``||mu_a - mu_b||^2 + sum(va + vb - 2 sqrt(va vb))``, and is 0 between a set and itself."""
    rng = np.random.default_rng(6)
    mu_a, mu_b = rng.normal(size=4), rng.normal(size=4)
    va, vb = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    a = mu_a + rng.normal(size=(200_000, 4)) * np.sqrt(va)
    b = mu_b + rng.normal(size=(200_000, 4)) * np.sqrt(vb)
    want = np.sum((mu_a - mu_b) ** 2) + np.sum(va + vb - 2 * np.sqrt(va * vb))
    assert frechet_distance(a, b) == pytest.approx(want, rel=0.02)
    assert abs(frechet_distance(a[:500], a[:500])) < 1e-6
