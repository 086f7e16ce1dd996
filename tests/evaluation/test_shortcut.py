"""The shortcut measures (advalign_jax.evaluation.shortcut) on models whose answers are known."""

import jax.numpy as jnp
import numpy as np

from advalign_jax.evaluation import shortcut

SIZE = 16


def _linear(w):
    """Logits ``f_j(x) = sum(w_j * x)`` for weights (K, H, W, C)."""
    return lambda x: jnp.einsum("nhwc,khwc->nk", x, w)


def test_patch_share_of_uniform_and_patch_only_maps():
    mask = jnp.asarray(shortcut.patch_mask(SIZE))
    assert 0 < float(mask.mean()) < 0.1
    uniform = jnp.ones((2, SIZE, SIZE))
    np.testing.assert_allclose(shortcut.patch_share(uniform, mask), float(mask.mean()), rtol=1e-6)
    np.testing.assert_allclose(shortcut.patch_share(uniform * mask, mask), 1.0)
    assert np.isnan(np.asarray(shortcut.patch_share(jnp.zeros((1, SIZE, SIZE)), mask))).all()


def test_linear_model_first_order_is_the_change(rng):
    w = jnp.asarray(rng.normal(size=(3, SIZE, SIZE, 3)), jnp.float32)
    x = jnp.asarray(rng.uniform(size=(4, SIZE, SIZE, 3)), jnp.float32)
    mask = shortcut.patch_mask(SIZE)[None, ..., None]
    x_swap = x * (1 - mask) + mask * jnp.asarray(rng.uniform(size=(4, 1, 1, 3)), jnp.float32)
    y, k = jnp.array([0, 1, 2, 0]), jnp.array([1, 2, 0, 2])
    out = shortcut.swap_measures(_linear(w), x, x_swap, y, k)
    np.testing.assert_allclose(out["swap_first_order"], out["swap_change"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["swap_at_midpoint"], 0.5 * out["swap_change"], rtol=1e-4, atol=1e-4)
    logits = _linear(w)(x_swap)
    np.testing.assert_array_equal(out["follows"], (np.argmax(logits, -1) == k).astype(np.float32))


def test_a_response_flat_at_the_image_is_invisible_to_the_gradient():
    """Class 1's logit is a steep step in the patch's mean red level, saturated at the image's colour
    (0) and at the painted one (1): the swap moves the margin by 2 x 10, the gradient predicts ~0."""
    mask = jnp.asarray(shortcut.patch_mask(SIZE))

    def logits_fn(x):
        red = jnp.sum(x[..., 0] * mask, axis=(1, 2)) / jnp.sum(mask)
        step = 10.0 * jnp.tanh(20.0 * (red - 0.5))
        return jnp.stack([-step, step], axis=-1)

    x = jnp.zeros((2, SIZE, SIZE, 3))
    x_swap = x.at[..., 0].set(mask)
    out = shortcut.swap_measures(logits_fn, x, x_swap, jnp.array([0, 0]), jnp.array([1, 1]))
    np.testing.assert_allclose(out["swap_change"], -40.0, rtol=1e-4)
    assert np.all(np.abs(np.asarray(out["swap_first_order"])) < 1e-3)
    np.testing.assert_allclose(out["swap_at_midpoint"], -20.0, rtol=1e-4)  # the step is at the midpoint
    np.testing.assert_array_equal(out["follows"], 1.0)


def test_a_colour_contrast_on_the_patch_cancels_in_the_channel_mean():
    """The true-class gradient is +1 (red) and -1 (green) on the patch and +0.1 in every channel
    elsewhere: its channel mean vanishes on the patch (agreement 0), while max |g| puts most of its
    mass there."""
    mask = shortcut.patch_mask(SIZE)
    w = np.zeros((2, SIZE, SIZE, 3), np.float32)
    w[0] = 0.1 * (1 - mask)[..., None]
    w[0, ..., 0] += mask
    w[0, ..., 1] -= mask
    x = jnp.full((3, SIZE, SIZE, 3), 0.5)
    out = shortcut.gradient_measures(_linear(jnp.asarray(w)), x, jnp.zeros(3, jnp.int32), jnp.asarray(mask))
    np.testing.assert_allclose(out["cancellation_patch"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["cancellation_elsewhere"], 1.0, rtol=1e-5)
    area = mask.mean()
    np.testing.assert_allclose(out["absmax"], area / (area + 0.1 * (1 - area)), rtol=1e-5)
    np.testing.assert_allclose(out["channel_B"], 0.0, atol=1e-7)
    np.testing.assert_allclose(out["mean_cut"], 0.0, atol=1e-7)  # the loss's saliency has nothing there


def test_loss_leverage_is_the_share_of_the_alignment_term_on_the_patch():
    """No gradient on the patch (and a mismatch elsewhere): leverage 0 for every reduction. A gradient bump on the patch (where the
    human map is 0) on top of the map: the term without the patch is the map-only one, so the leverage
    is ``1 - align(map-only) / align(with bump)``, computed here from the loss function itself."""
    from advalign_jax.losses.harmonization import alignment_term

    mask = shortcut.patch_mask(SIZE)
    maps = np.zeros((1, SIZE, SIZE), np.float32)
    maps[0, 6:12, 6:12] = 1.0
    ramp = np.linspace(0.0, 0.5, SIZE)[None, :] * np.ones((SIZE, 1))  # off the map: a mismatch to align
    w_map = np.repeat((maps[0] + ramp)[None, ..., None], 3, axis=-1) * (1 - mask)[None, ..., None]
    w_bump = w_map + 2.0 * mask[None, ..., None]
    x = jnp.zeros((1, SIZE, SIZE, 3))
    y = jnp.zeros(1, jnp.int32)
    for w, bump in ((w_map, False), (w_bump, True)):
        g = shortcut.true_class_gradient(_linear(jnp.asarray(w)), x, y)
        out = shortcut.loss_leverage(g, jnp.asarray(maps), jnp.asarray(mask))
        for r in ("mean", "absmax", "mean_abs"):
            if not bump:
                np.testing.assert_allclose(out[f"leverage_{r}"], 0.0, atol=1e-6)
            else:
                one = jnp.ones(1)
                want = 1 - alignment_term(jnp.asarray(w_map[..., 0]), maps, one) / alignment_term(
                    jnp.asarray(w_bump[..., 0]), maps, one)
                np.testing.assert_allclose(out[f"leverage_{r}"], want, rtol=1e-5)
                assert float(out[f"leverage_{r}"][0]) > 0.1
