"""The harmonizer loss against the harmonization package's TensorFlow functions (0.0.9)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import reference_harmonization as ref
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import ConfigError
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


def _grads(km, batch, bn, dtype=jnp.float32, **cfg):
    params, state = _flax_variables(km)
    params, state = jax.tree.map(lambda a: jnp.asarray(a, dtype), (params, state))
    batch = {k: (jnp.asarray(v, dtype) if k != "label" else v) for k, v in batch.items()}
    model = Model(name="tiny", module=TinyNet(bn=bn, dtype=dtype), num_classes=5, input_shape=(32, 32, 3),
                  options={})
    (value, (new_state, metrics)), grads = jax.value_and_grad(harmonizer.loss, argnums=1, has_aux=True)(
        model, params, state, batch, None, _cfg(**cfg))
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


# ----------------------------------------------------------------------------------------------------
# The channel reductions other than the reference's signed mean (objective.saliency)
# ----------------------------------------------------------------------------------------------------

def test_reduce_saliency_against_numpy(rng):
    g = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(H.reduce_saliency(g, "mean"), g.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(H.reduce_saliency(g, "absmax"), np.abs(g).max(-1), rtol=1e-6)
    np.testing.assert_allclose(H.reduce_saliency(g, "mean_abs"), np.abs(g).mean(-1), rtol=1e-6)
    # a colour contrast: opposite channels cancel in the signed mean only
    contrast = np.zeros((1, 2, 2, 3), np.float32)
    contrast[..., 0], contrast[..., 1] = 2.0, -2.0
    assert float(np.abs(H.reduce_saliency(contrast, "mean")).max()) == 0.0
    assert float(H.reduce_saliency(contrast, "mean_abs").min()) == pytest.approx(4.0 / 3.0)
    with pytest.raises(ValueError, match="mean_abs"):
        H.reduce_saliency(g, "max")


def test_a_colour_contrast_passes_the_signed_mean_unpenalised(rng):
    """The loophole docs/demonstration.md measures: an input-gradient that matches the human map plus a
    strong colour contrast (+5 red, -5 green) on a patch the map leaves out has exactly the alignment
    term of the gradient without the patch under 'mean'; 'absmax' and 'mean_abs' penalise it."""
    maps = np.zeros((2, 32, 32), np.float32)
    maps[:, 8:24, 8:24] = rng.uniform(0.5, 1.0, size=(2, 16, 16))
    clean = np.repeat(maps[..., None], 3, axis=-1)
    contrast = clean.copy()
    contrast[:, 26:30, 26:30, 0] += 5.0
    contrast[:, 26:30, 26:30, 1] -= 5.0
    tokens = np.ones(2, np.float32)
    term = {v: [float(H.alignment_term(H.reduce_saliency(jnp.asarray(g), v), maps, tokens)) for g in (clean, contrast)]
            for v in H.SALIENCY_REDUCTIONS}
    assert term["mean"][1] == pytest.approx(term["mean"][0], abs=1e-7)
    for v in ("absmax", "mean_abs"):
        assert term[v][1] > 10 * term[v][0] + 1e-3, (v, term[v])


def _tf_variant_grads(km, batch, reduce):
    """The package's ``harmonizer_loss`` with its channel mean replaced by ``reduce`` (TensorFlow):
    the same two tapes, the package's own standardize-cut and pyramidal MSE."""
    loss_mod = ref.load("training.loss")
    images, tokens = tf.constant(batch["image"]), tf.constant(batch["token"])
    labels = tf.constant(np.eye(5, dtype=np.float32)[batch["label"]])
    variables = KerasForReference(km).trainable_variables
    with tf.GradientTape() as tape:
        with tf.GradientTape() as inner:
            inner.watch(images)
            y_pred = km(images, training=True)
            picked = tf.reduce_sum(y_pred * labels, -1)
        s = loss_mod.standardize_cut(reduce(inner.gradient(picked, images)))
        h = loss_mod.standardize_cut(tf.constant(batch["heatmap"]))
        h = h / (tf.reduce_max(h, (1, 2), keepdims=True) + 1e-6) * (
            tf.stop_gradient(tf.reduce_max(s, (1, 2), keepdims=True)) + 1e-6)
        align = loss_mod.pyramidal_mse_with_tokens(s, h, tokens)
        ce = tf.reduce_mean(loss_mod.Cross_entropy(labels, y_pred))
        decay = tf.add_n([tf.nn.l2_loss(v) for v in variables])
        loss = ce + 1e-5 * decay + align
    return {v.path: g.numpy() for v, g in zip(km.trainable_variables, tape.gradient(loss, variables))}


@pytest.mark.parametrize("variant", ["absmax", "mean_abs"])
def test_other_saliency_reductions_match_tensorflow(rng, variant):
    """``objective.saliency`` 'absmax' and 'mean_abs': the whole parameter gradient (double backprop
    through |g|) within 1e-5 of the package's loss with that reduction in place of its channel mean."""
    reduce = {"absmax": lambda g: tf.reduce_max(tf.abs(g), -1), "mean_abs": lambda g: tf.reduce_mean(tf.abs(g), -1)}
    km = _keras_tiny(4, bn=False)
    batch = _batch(rng, [1, 0, 1, 1])
    ours = _by_keras_name(_grads(km, batch, bn=False, saliency=variant)[3])
    with jax.enable_x64(True):
        exact = _by_keras_name(jax.tree.map(np.asarray, _grads(km, batch, bn=False, dtype=jnp.float64,
                                                               saliency=variant)[3]))
    want = _tf_variant_grads(km, batch, reduce[variant])
    _assert_agreement(ours, want, exact)
    mean = _by_keras_name(_grads(km, batch, bn=False)[3])
    assert _rel(mean["conv1/kernel"], ours["conv1/kernel"]) > 1e-3  # the reduction changes the gradient


def test_harmonizer_config_is_checked_before_training():
    from advalign_jax.models import registry

    model = registry.get_model("small_cnn", num_classes=10, input_size=32)
    for key, value, words in (("saliency", "max", "objective.saliency"),
                              ("lambda_harmonization", -1.0, "lambda_harmonization"),
                              ("pyramid_levels", 0, "pyramid_levels")):
        config = ml_collections.ConfigDict({"objective": _cfg(**{key: value})})
        with pytest.raises(ConfigError, match=words):
            harmonizer.validate(config, model)
    harmonizer.validate(ml_collections.ConfigDict({"objective": _cfg(saliency="mean_abs")}), model)


def test_decay_mask_follows_the_reference_substrings():
    from advalign_jax.training.config_blocks import REFERENCE_DECAY_EXCLUDE
    from advalign_jax.training.objectives.ce import l2_term

    params = {"conv1_bn/": {"gamma": np.ones(2)}, "conv1": {"kernel": np.full(3, 2.0)},
              "LayerNorm_0": {"scale": np.ones(4)}, "class_token": np.ones(5), "embedding": {"kernel": np.ones(6)}}
    # Keras-2-style names: conv1_bn/gamma, LayerNorm_0/..., class_token and embedding are excluded.
    assert float(l2_term(params, REFERENCE_DECAY_EXCLUDE)) == pytest.approx(0.5 * 3 * 4.0)


# ----------------------------------------------------------------------------------------------------
# Constant saliency maps (a dead network, a model whose input-gradient is flat): finite gradients
# ----------------------------------------------------------------------------------------------------

def test_standardize_cut_of_a_constant_map_has_a_finite_gradient():
    """std = 0: the value is 0 (as the reference's), and the derivative is finite (TensorFlow's square
    root passes a zero cotangent as zero; the naive 0 x inf would be NaN)."""
    h = np.stack([np.zeros((6, 6)), np.full((6, 6), 2.5), np.arange(36.0).reshape(6, 6)]).astype(np.float32)
    want = ref.load("training.loss").standardize_cut(tf.constant(h)).numpy()
    np.testing.assert_allclose(np.asarray(H.standardize_cut(h)), want, rtol=1e-5, atol=1e-6)
    weights = np.random.default_rng(0).normal(size=h.shape).astype(np.float32)
    grad = jax.grad(lambda v: jnp.sum(H.standardize_cut(v) * weights))(jnp.asarray(h))
    x = tf.constant(h)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = tf.reduce_sum(ref.load("training.loss").standardize_cut(x) * weights)
    want_grad = tape.gradient(out, x).numpy()
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.isfinite(want_grad))
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)


class FlatNet(nn.Module):
    """global average - dense(5): its input-gradient is the same at every pixel (a constant map)."""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(5, name="head", dtype=self.dtype, param_dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


def _keras_flat(seed):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3))
    out = keras.layers.Dense(5, name="head")(keras.layers.GlobalAveragePooling2D()(inp))
    return keras.Model(inp, out)


def _loss_grads(module, params, batch, cfg, dtype=jnp.float32):
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    batch = {k: (jnp.asarray(v, dtype) if k != "label" else v) for k, v in batch.items()}
    model = Model(name="tiny", module=module, num_classes=5, input_shape=(32, 32, 3), options={})
    (value, (_, metrics)), grads = jax.value_and_grad(harmonizer.loss, argnums=1, has_aux=True)(
        model, params, {}, batch, None, cfg)
    return value, metrics, grads


@pytest.mark.parametrize("tokens", [[1, 1, 1, 1], [0, 1, 0, 1]])
def test_constant_saliency_rows_give_the_reference_gradient(rng, tokens):
    """Every saliency row constant (FlatNet): the whole parameter gradient finite and equal to the
    package's, whatever the tokens."""
    km = _keras_flat(4)
    batch = _batch(rng, tokens)
    get = {w.path: w.numpy() for w in km.weights}
    params = {"head": {"kernel": get["head/kernel"], "bias": get["head/bias"]}}
    value, _, grads = _loss_grads(FlatNet(), params, batch, _cfg())
    assert np.isfinite(float(value))
    flat = {f"head/{w}": np.asarray(grads["head"][w]) for w in ("kernel", "bias")}
    want = _reference_grads(km, batch)
    for name, g in flat.items():
        assert np.all(np.isfinite(g)), name
        assert np.all(np.isfinite(want[name])), name
        assert _rel(g, want[name]) < 1e-5, (name, _rel(g, want[name]))


@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_a_dead_image_gives_the_reference_gradient(rng, lam):
    """One image whose every ReLU is off (a zero image, negative first-layer biases): its saliency is
    all zero. The parameter gradient stays finite and equals the package's (lambda 1), and equals
    cross-entropy + weight decay alone at lambda 0."""
    km = _keras_tiny(5, bn=False)
    conv1 = km.get_layer("conv1")
    conv1.bias.assign(-np.abs(conv1.bias.numpy()) - 0.2)
    batch = _batch(rng, [1, 1, 0, 1])
    batch["image"][1] = 0.0
    params, _ = _flax_variables(km)
    value, metrics, grads = _loss_grads(TinyNet(bn=False), params, batch, _cfg(lambda_harmonization=lam))
    assert np.isfinite(float(value))
    ours = _by_keras_name(grads)
    for name, g in ours.items():
        assert np.all(np.isfinite(np.asarray(g))), name
    if lam:
        with jax.enable_x64(True):
            exact = _loss_grads(TinyNet(bn=False, dtype=jnp.float64), params, batch,
                                _cfg(lambda_harmonization=lam), dtype=jnp.float64)[2]
            exact = _by_keras_name(jax.tree.map(np.asarray, exact))
        _assert_agreement(ours, _reference_grads(km, batch), exact)
    else:
        _, _, plain = _loss_grads(TinyNet(bn=False), params, {**batch, "token": np.zeros(4, np.float32)},
                                  _cfg(lambda_harmonization=1.0))
        for name, g in _by_keras_name(plain).items():
            np.testing.assert_allclose(np.asarray(ours[name]), np.asarray(g), rtol=1e-6, atol=1e-9, err_msg=name)


# ----------------------------------------------------------------------------------------------------
# The two orders of differentiation (objective.differentiation) give the same loss and gradient
# ----------------------------------------------------------------------------------------------------

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class _Float64Model:
    """A module applied in float64 end to end (``Model.apply_train`` returns float32 logits)."""

    num_classes = 5

    def __init__(self, module):
        self.module = module

    def apply_train(self, variables, images, rng=None):
        mutable = ["batch_stats"] if "batch_stats" in variables else False
        out = self.module.apply(variables, images, train=True, mutable=mutable)
        return out if mutable else (out, {})


@pytest.mark.parametrize("case", ["batchnorm", "dead_image", "constant_rows"])
def test_reverse_over_forward_equals_reverse_over_reverse(rng, case):
    """float64: loss, full parameter gradient and new BatchNorm state of the harmonizer objective agree
    to 1e-10 between the two orders: with training-mode BatchNorm, with one all-zero saliency map (a
    dead image), and with every saliency row constant (FlatNet; the safe standard deviation)."""
    batch = _batch(rng, [1, 1, 0, 1] if case != "constant_rows" else [1, 1, 1, 1])
    module = FlatNet(dtype=jnp.float64) if case == "constant_rows" else TinyNet(bn=case == "batchnorm",
                                                                                 dtype=jnp.float64)
    with jax.enable_x64(True):
        variables = jax.jit(lambda key: module.init(key, jnp.zeros((1, 32, 32, 3)), train=False),
                            compiler_options=FAST_COMPILE)(jax.random.PRNGKey(1))
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), dict(variables))
        if case == "batchnorm":
            variables["batch_stats"] = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape)),
                                                    variables["batch_stats"])
        if case == "dead_image":  # every ReLU off on a zero image
            conv1 = variables["params"]["conv1"]
            conv1["bias"] = -jnp.abs(conv1["bias"]) - 0.2
            batch["image"][1] = 0.0
        batch = {k: (jnp.asarray(v, jnp.float64) if k != "label" else jnp.asarray(v)) for k, v in batch.items()}
        params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
        model = _Float64Model(module)
        out = {}
        for order in harmonizer.DIFFERENTIATIONS:
            step = jax.jit(jax.value_and_grad(
                lambda p, order=order: harmonizer.loss(model, p, state, batch, None, _cfg(differentiation=order)),
                has_aux=True), compiler_options=FAST_COMPILE)
            out[order] = jax.tree.map(np.asarray, step(params))
    (va, (sa, ma)), ga = out["reverse_over_reverse"]
    (vb, (sb, mb)), gb = out["reverse_over_forward"]
    assert np.isfinite(va) and abs(va - vb) <= 1e-10 * abs(va) and float(ma["loss"]) == float(va)
    assert float(ma["alignment"]) > 0
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(ga)))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
        assert a.dtype == np.float64 and np.all(np.isfinite(b)), path
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-3 * total)
        assert rel < 1e-10, (path, rel)
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        assert _rel(b, a) < 1e-10
    if case == "batchnorm":
        assert jax.tree.leaves(sa)  # the running statistics were updated
    with pytest.raises(ConfigError, match="differentiation"):
        harmonizer.loss(model, params, state, batch, None, _cfg(differentiation="forward"))
