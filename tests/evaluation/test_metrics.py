"""Metrics against SciPy and the harmonization package's own metric functions."""

import jax
import numpy as np
from scipy import ndimage, stats

import reference_harmonization as ref
from advalign_jax.evaluation import metrics


def _maps(rng, n=6, size=48):
    a = rng.normal(size=(n, size, size)).astype(np.float32)
    blurred = np.stack([ndimage.gaussian_filter(np.maximum(m, 0), 3) for m in a]).astype(np.float32)
    quantised = np.round(a * 2) / 2  # heavy ties
    mostly_zero = np.where(rng.uniform(size=a.shape) < 0.9, 0.0, a).astype(np.float32)
    return a, blurred, quantised, mostly_zero


def test_average_ranks_match_scipy(rng):
    v = np.round(rng.normal(size=500) * 3).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(metrics.average_ranks(v)), stats.rankdata(v))


def test_spearman_matches_scipy_with_ties(rng):
    maps = _maps(rng)
    for a in maps:
        for b in maps:
            ours = np.asarray(jax.jit(metrics.spearman)(a, b))
            want = np.array([stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)])
            np.testing.assert_allclose(ours, want, atol=1e-6)


def test_spearman_full_size_heavily_tied(rng):
    """224x224 blurred maps vs quantised masks: the clickme-sized case."""
    heat = ndimage.gaussian_filter(rng.uniform(size=(2, 224, 224)), (0, 8, 8)).astype(np.float32)
    heat = np.round(heat * 50) / 50
    mask = np.abs(np.round(rng.normal(size=(2, 224, 224)), 1)).astype(np.float32)
    ours = np.asarray(metrics.spearman(mask, heat))
    want = [stats.spearmanr(m.ravel(), h.ravel())[0] for m, h in zip(mask, heat)]
    np.testing.assert_allclose(ours, want, atol=1e-6)


def test_constant_maps_are_undefined_not_averaged(rng):
    a = rng.normal(size=(3, 16, 16)).astype(np.float32)
    b = a.copy()
    b[1] = 0.0  # an all-zero map (an image without a human map)
    rho = np.asarray(metrics.spearman(a, b))
    defined = np.asarray(metrics.spearman_defined(a, b))
    assert np.isnan(rho[1]) and not defined[1] and defined[0] and defined[2]
    with np.errstate(invalid="ignore"):
        assert np.isnan(stats.spearmanr(a[1].ravel(), b[1].ravel())[0])  # scipy agrees it is undefined
    np.testing.assert_allclose(rho[[0, 2]], 1.0, atol=1e-6)


def test_invariants(rng):
    a = ndimage.gaussian_filter(rng.uniform(size=(4, 32, 32)), (0, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(metrics.spearman(a, a)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.spearman(a, -a)), -1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.top_fraction_dice(a, a)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.top_fraction_iou(a, a)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.top_fraction_dice(a, -a)), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.top_fraction_iou(a, -a)), 0.0, atol=1e-6)


def test_dice_and_iou_match_the_harmonization_package(rng):
    reference = ref.load("evaluation.metrics")
    for a, b in [(x, y) for x in _maps(rng, 4, 40) for y in _maps(rng, 4, 40)]:
        np.testing.assert_allclose(np.asarray(metrics.top_fraction_dice(a, b)), reference.dice(a, b), atol=1e-6)
        np.testing.assert_allclose(np.asarray(metrics.top_fraction_iou(a, b)),
                                   reference.intersection_over_union(a, b), atol=1e-6)
        np.testing.assert_allclose(np.asarray(metrics.spearman(a, b)), reference.spearman_correlation(a, b),
                                   atol=1e-6)


def test_perturbation_mask_and_norms(rng):
    x = rng.uniform(size=(3, 8, 8, 3)).astype(np.float32)
    x_adv = (x + rng.normal(size=x.shape) * 0.1).astype(np.float32)
    d = x_adv - x
    np.testing.assert_allclose(np.asarray(metrics.perturbation_mask(x_adv, x)), np.abs(d.mean(-1)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.l2_norm(d)), np.linalg.norm(d.reshape(3, -1), axis=1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.linf_norm(d)), np.abs(d).reshape(3, -1).max(1), rtol=1e-6)
