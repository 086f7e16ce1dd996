"""Right for the right reasons (objective 'rrr') against a PyTorch implementation of Ross et al.'s
eq. 1 (double backprop with ``torch.autograd.grad(create_graph=True)``), in float64 on both sides."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from advalign_jax.config import load_config
from advalign_jax.errors import ConfigError
from advalign_jax.models import registry
from advalign_jax.training.objectives import rrr
from advalign_jax.training.trainer import train

torch = pytest.importorskip("torch")


class Net(nn.Module):
    """conv(4, 3x3, SAME) - ReLU - conv(4, 3x3, SAME) - ReLU - spatial mean - dense(5)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="c1", **kw)(x))
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="c2", **kw)(x))
        return nn.Dense(5, name="head", **kw)(jnp.mean(x, axis=(1, 2)))


class _Model:
    num_classes = 5

    def apply_train(self, variables, images, rng=None):
        return Net().apply(variables, images), {}


def _torch_loss_grads(params, batch, lam, threshold):
    """The same loss in PyTorch (NCHW), and its gradient w.r.t. every parameter."""
    t = {f"{layer}/{w}": torch.tensor(np.asarray(params[layer][w]), requires_grad=True)
         for layer in params for w in params[layer]}
    x = torch.tensor(np.transpose(batch["image"], (0, 3, 1, 2)), requires_grad=True)

    def conv(h, name):
        return torch.nn.functional.conv2d(h, t[f"{name}/kernel"].permute(3, 2, 0, 1), t[f"{name}/bias"], padding=1)

    h = torch.relu(conv(torch.relu(conv(x, "c1")), "c2")).mean(dim=(2, 3))
    logits = h @ t["head/kernel"] + t["head/bias"]
    (g,) = torch.autograd.grad(torch.log_softmax(logits, -1).sum(), x, create_graph=True)
    phi = torch.tensor(batch["heatmap"])[:, None]
    a = (phi < threshold).double() if threshold > 0 else 1.0 - phi
    term = ((a * g) ** 2).sum(dim=(1, 2, 3)) * torch.tensor(batch["token"])
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(batch["label"]))
    loss = ce + lam * term.mean()
    grads = torch.autograd.grad(loss, list(t.values()))
    return float(loss.detach()), float(term.mean().detach()), {k: v.numpy() for k, v in zip(t, grads)}


def _cfg(**kw):
    c = ml_collections.ConfigDict(dict(lambda_rrr=0.7, rrr_threshold=0.0, label_smoothing=0.0, weight_decay=0.0,
                                       decay_exclude=()))
    c.update(kw)
    return c


@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_loss_and_parameter_gradient_match_pytorch(rng, threshold):
    batch = {"image": rng.normal(size=(3, 8, 8, 3)), "label": np.array([0, 4, 2]),
             "heatmap": rng.uniform(size=(3, 8, 8)), "token": np.array([1.0, 0.0, 1.0])}
    with jax.enable_x64(True):
        params = Net().init(jax.random.PRNGKey(3), jnp.zeros((1, 8, 8, 3), jnp.float64))["params"]
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) * 2.0, params)  # larger logits: p far from uniform
        jb = {k: jnp.asarray(v) for k, v in batch.items()}
        (value, (_, metrics)), grads = jax.value_and_grad(rrr.loss, argnums=1, has_aux=True)(
            _Model(), params, {}, jb, None, _cfg(rrr_threshold=threshold))
        grads = {f"{layer}/{w}": np.asarray(grads[layer][w]) for layer in grads for w in grads[layer]}
        numpy_params = jax.tree.map(np.asarray, params)
    want_loss, want_term, want = _torch_loss_grads(numpy_params, batch, 0.7, threshold)
    assert float(metrics["rrr"]) > 0.01 * float(metrics["ce"])  # the term matters in this test
    assert float(value) == pytest.approx(want_loss, rel=1e-12)
    assert float(metrics["rrr"]) == pytest.approx(want_term, rel=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(g, want[name], rtol=1e-9, atol=1e-12 * np.abs(want[name]).max(), err_msg=name)


def test_the_gradient_of_the_log_probabilities_vanishes_at_uniform_predictions():
    """``d/dx sum_k log p_k = J^T (1 - K p)``: zero where the prediction is uniform, whatever J."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
    x = jnp.ones((2, 6), jnp.float32)
    logits, vjp = jax.vjp(lambda v: v @ w * 0.0, x)
    np.testing.assert_array_equal(np.asarray(rrr.log_probability_gradient(vjp, logits)), 0.0)
    logits, vjp = jax.vjp(lambda v: v @ w, x)
    p = jax.nn.softmax(logits)
    np.testing.assert_allclose(rrr.log_probability_gradient(vjp, logits), (1 - 4 * p) @ w.T, rtol=1e-5)


def test_config_mistakes_are_one_line_before_training():
    model = registry.get_model("small_cnn", num_classes=10, input_size=32)
    for key, value, words in (("lambda_rrr", float("nan"), "lambda_rrr"), ("rrr_threshold", 1.5, "rrr_threshold")):
        with pytest.raises(ConfigError, match=words):
            rrr.validate(ml_collections.ConfigDict({"objective": _cfg(**{key: value}), "data_kind": "clickme"}), model)
    with pytest.raises(ConfigError, match="human maps"):
        rrr.validate(ml_collections.ConfigDict({"objective": _cfg(), "data_kind": "arrays"}), model)


def test_demo_rrr_recipe_trains(small_shards, tmp_path):
    """``configs/demo.py:rrr`` through the trainer (a few steps on the small shards): the term is logged."""
    config = load_config("configs/demo.py:rrr", [f"data.files=('{os.path.dirname(small_shards[0])}/*.tfrecords',)",
                                                  "eval_data.files=()", f"workdir={tmp_path / 'r'}", "data.image_size=32",
                                                  "data.batch_size=8", "total_steps=3", "checkpoint_every=3",
                                                  "log_every=1", "steps_per_epoch=3"])
    result = train(config, progress=False, log=lambda *a: None)
    assert np.isfinite(result["loss"]) and result["rrr"] > 0
    assert open(tmp_path / "r" / "metrics.csv").readline().split(",").count("rrr") == 1
