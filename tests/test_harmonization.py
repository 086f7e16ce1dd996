"""The harmonizer loss against the harmonization package's TensorFlow functions (0.0.9)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import reference_harmonization as ref
from advalign_jax.data.tf_env import import_tf
from advalign_jax.losses import harmonization as H
from advalign_jax.models.base import Model
from advalign_jax.training.objectives import harmonizer

tf = import_tf()


def _rel(a, b):
    """Relative error ||a - b||_2 / ||b||_2."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_standardize_cut(rng):
    h = rng.normal(size=(4, 20, 20)).astype(np.float32) * 3 + 1
    want = ref.load("training.loss").standardize_cut(tf.constant(h)).numpy()
    np.testing.assert_allclose(np.asarray(H.standardize_cut(h)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [224, 64, 37])
def test_pyramid_matches_reference(rng, size):
    x = rng.uniform(size=(2, size, size)).astype(np.float32)
    want = ref.load("training.pyramid").pyramidal_representation(tf.constant(x[..., None]), 5)
    ours = H.pyramid(jnp.asarray(x), 6)
    assert len(ours) == len(want) == 6
    for a, b in zip(ours, want):
        assert a.shape == b.shape[:3]
        assert _rel(a, b.numpy()[..., 0]) < 1e-5
    if size == 224:
        assert [p.shape[1] for p in ours] == [224, 112, 56, 28, 14, 7]


def test_pyramidal_mse_with_tokens(rng):
    a = rng.uniform(size=(4, 64, 64)).astype(np.float32)
    b = rng.uniform(size=(4, 64, 64)).astype(np.float32)
    t = np.array([1, 0, 1, 1], np.float32)
    want = ref.load("training.loss").pyramidal_mse_with_tokens(tf.constant(a), tf.constant(b), tf.constant(t))
    assert _rel(H.pyramidal_mse(a, b, t, 5), want.numpy()) < 1e-5


def test_zero_maps_and_token_zero_are_finite_and_zero(rng):
    sal = rng.normal(size=(3, 32, 32)).astype(np.float32)
    zero_maps = np.zeros((3, 32, 32), np.float32)
    value = H.alignment_term(sal, zero_maps, np.ones(3, np.float32))
    assert np.isfinite(value)
    term = H.alignment_term(sal, rng.uniform(size=(3, 32, 32)).astype(np.float32), np.zeros(3, np.float32))
    assert float(term) == 0.0
    grad = jax.grad(lambda s: H.alignment_term(s, zero_maps, np.zeros(3, np.float32)))(jnp.asarray(sal))
    assert np.all(np.isfinite(np.asarray(grad)))


class TinyNet(nn.Module):
    """conv(8) [- BN] - ReLU - conv(8) - global average - dense(5), as the Keras model below."""

    bn: bool = True
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.dtype)
        x = nn.Conv(8, (3, 3), padding="SAME", name="conv1", **kw)(x)
        if self.bn:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name="bn", **kw)(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), padding="SAME", name="conv2", **kw)(x)
        return nn.Dense(5, name="head", **kw)(jnp.mean(x, axis=(1, 2)))


def _keras_tiny(seed, bn=True):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    if bn:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    out = keras.layers.Dense(5, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for w in model.weights:  # random values everywhere, BN statistics included
        value = rng.normal(size=w.shape).astype(np.float32) * 0.3
        w.assign(np.abs(value) + 0.5 if "variance" in w.path else value)
    return model


def _flax_variables(km):
    get = {w.path: w.numpy() for w in km.weights}
    params = {name: {"kernel": get[f"{name}/kernel"], "bias": get[f"{name}/bias"]}
              for name in ("conv1", "conv2", "head")}
    state = {}
    if "bn/gamma" in get:
        params["bn"] = {"scale": get["bn/gamma"], "bias": get["bn/beta"]}
        state = {"batch_stats": {"bn": {"mean": get["bn/moving_mean"], "var": get["bn/moving_variance"]}}}
    return params, state


class KerasForReference:
    """Hands the package the tf.Variables under Keras 3's variables (it watches them on a GradientTape);
    their names ('bn/gamma:0', ...) are what its weight-decay mask reads."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, training=False):
        return self.model(x, training=training)

    @property
    def trainable_variables(self):
        return [v.value for v in self.model.trainable_variables]


def _cfg(**kw):
    from advalign_jax.training.config_blocks import REFERENCE_DECAY_EXCLUDE

    c = ml_collections.ConfigDict(dict(lambda_harmonization=1.0, pyramid_levels=5, saliency="mean",
                                       label_smoothing=0.1, weight_decay=1e-5,
                                       decay_exclude=REFERENCE_DECAY_EXCLUDE))
    c.update(kw)
    return c


def _grads(km, batch, bn, dtype=jnp.float32):
    params, state = _flax_variables(km)
    params, state = jax.tree.map(lambda a: jnp.asarray(a, dtype), (params, state))
    batch = {k: (jnp.asarray(v, dtype) if k != "label" else v) for k, v in batch.items()}
    model = Model(name="tiny", module=TinyNet(bn=bn, dtype=dtype), num_classes=5, input_shape=(32, 32, 3),
                  options={})
    (value, (new_state, metrics)), grads = jax.value_and_grad(harmonizer.loss, argnums=1, has_aux=True)(
        model, params, state, batch, None, _cfg())
    return value, new_state, metrics, grads


def _by_keras_name(grads):
    out = {f"{n}/{w}": grads[n][w] for n in ("conv1", "conv2", "head") for w in ("kernel", "bias")}
    if "bn" in grads:
        out["bn/gamma"], out["bn/beta"] = grads["bn"]["scale"], grads["bn"]["bias"]
    return out


def _batch(rng, tokens):
    # Zero-mean inputs, as models see them after their input normalisation.
    return {"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32), "label": np.array([0, 3, 1, 4]),
            "heatmap": (rng.uniform(size=(4, 32, 32)) ** 3).astype(np.float32),
            "token": np.asarray(tokens, np.float32)}


def _reference_grads(km, batch):
    onehot = np.eye(5, dtype=np.float32)[batch["label"]]
    grads = ref.load("training.loss").harmonizer_loss(
        KerasForReference(km), tf.constant(batch["image"]), tf.constant(batch["token"]), tf.constant(onehot),
        tf.constant(batch["heatmap"]))
    return {v.path: g.numpy() for v, g in zip(km.trainable_variables, grads)}


def _compare(km, batch, bn):
    """Our float32 gradient against the package's (TensorFlow float32) and against the exact one
    (ours in float64). Returns (ours, reference, exact) keyed by Keras variable path."""
    value, new_state, metrics, grads = _grads(km, batch, bn=bn)
    assert np.isfinite(value)
    with jax.enable_x64(True):
        exact = jax.tree.map(np.asarray, _grads(km, batch, bn=bn, dtype=jnp.float64)[3])
    return _by_keras_name(grads), _reference_grads(km, batch), _by_keras_name(exact), new_state, metrics


def _assert_agreement(ours, want, exact, skip=()):
    """Per tensor: ours within 1e-5 of the exact gradient, and within 1e-5 of the package's, or within
    twice the package's own float32 error where that is larger (measured against float64)."""
    for name in ours:
        if name in skip:
            continue
        assert _rel(ours[name], exact[name]) < 1e-5, (name, _rel(ours[name], exact[name]))
        tol = max(1e-5, 2 * _rel(want[name], exact[name]))
        assert _rel(ours[name], want[name]) < tol, (name, _rel(ours[name], want[name]), tol)


@pytest.mark.parametrize("tokens", [[1, 1, 0, 1], [0, 0, 0, 0]])
def test_full_loss_gradient_matches_reference(rng, tokens):
    """Without BatchNorm: the whole parameter gradient within 1e-5 of the package's (float32)."""
    km = _keras_tiny(3, bn=False)
    batch = _batch(rng, tokens)
    ours, want, exact, _, metrics = _compare(km, batch, bn=False)
    flat = lambda d: np.concatenate([np.ravel(d[k]) for k in sorted(d)])  # noqa: E731
    assert _rel(flat(ours), flat(want)) < 1e-5
    _assert_agreement(ours, want, exact)
    if not any(tokens):
        assert float(metrics["alignment"]) == 0.0


def test_gradient_through_training_mode_batchnorm(rng):
    """With BatchNorm in training mode, shared by the cross-entropy and the saliency. Before the BN
    layer the second-order gradient goes through its mean subtraction, where TensorFlow's float32
    result drifts from the exact one (about 5e-4 on conv1/kernel here) while ours stays within 1e-5
    of it. conv1/bias feeds a training-mode BN: only the L2 term gives it a (tiny) gradient, so it is
    checked in absolute terms against the scale of the whole gradient."""
    km = _keras_tiny(3, bn=True)
    batch = _batch(rng, [1, 1, 0, 1])
    ours, want, exact, new_state, _ = _compare(km, batch, bn=True)
    _assert_agreement(ours, want, exact, skip=("conv1/bias",))
    scale = max(np.abs(v).max() for v in exact.values())
    assert np.abs(ours["conv1/bias"] - exact["conv1/bias"]).max() < 1e-6 * scale
    assert np.abs(want["conv1/bias"] - exact["conv1/bias"]).max() < 1e-3 * scale  # the package: float32 noise
    # BatchNorm statistics were updated once, from the batch, as one Keras training-mode call does.
    fresh = _keras_tiny(3, bn=True)
    fresh(tf.constant(batch["image"]), training=True)
    for ours_key, keras_var in (("mean", "moving_mean"), ("var", "moving_variance")):
        np.testing.assert_allclose(new_state["batch_stats"]["bn"][ours_key],
                                   getattr(fresh.get_layer("bn"), keras_var).numpy(), rtol=1e-5, atol=1e-6)


def test_decay_mask_follows_the_reference_substrings():
    from advalign_jax.training.config_blocks import REFERENCE_DECAY_EXCLUDE
    from advalign_jax.training.objectives.ce import l2_term

    params = {"conv1_bn/": {"gamma": np.ones(2)}, "conv1": {"kernel": np.full(3, 2.0)},
              "LayerNorm_0": {"scale": np.ones(4)}, "class_token": np.ones(5), "embedding": {"kernel": np.ones(6)}}
    # Keras-2-style names: conv1_bn/gamma, LayerNorm_0/..., class_token and embedding are excluded.
    assert float(l2_term(params, REFERENCE_DECAY_EXCLUDE)) == pytest.approx(0.5 * 3 * 4.0)
