"""The model API, the registry, checkpoints, and the checkpoint readers (against independent writers)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax.cli.main import main
from advalign_jax.errors import AdvalignError
from advalign_jax.models import get_model, list_models, load_model, save_model
from advalign_jax.models import importers
from model_checks import assert_close, random_images


def test_registry_lists_models_and_rejects_unknown_names():
    names = list_models()
    assert {"small_cnn", "mlp2"} <= set(names)
    with pytest.raises(AdvalignError, match="unknown model 'small_cn'; did you mean small_cnn"):
        get_model("small_cn")
    with pytest.raises(AdvalignError, match="has no option 'depth'"):
        get_model("small_cnn", depth=3)


def test_model_is_a_pure_function_and_train_mode_updates_batch_stats():
    model = get_model("small_cnn", num_classes=5, input_size=64)
    variables = model.init(jax.random.PRNGKey(0))
    x = random_images(0, 4, 64)
    a = jax.jit(model.apply)(variables, x)
    b = model.apply(variables, x)
    assert a.shape == (4, 5) and a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    logits, state = model.apply_train(variables, x)
    assert set(state) == {"batch_stats"}
    changed = jax.tree.map(lambda u, v: bool(np.any(np.asarray(u) != np.asarray(v))),
                           state["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    # An example's inference output does not depend on its batch mates.
    np.testing.assert_allclose(model.apply(variables, x[:1]), a[:1], rtol=1e-5, atol=1e-6)


def test_bfloat16_and_remat():
    x = random_images(1, 2, 64)
    f32 = get_model("small_cnn", input_size=64)
    variables = f32.init(jax.random.PRNGKey(1))
    bf16 = get_model("small_cnn", input_size=64, dtype="bfloat16")
    assert_close(bf16.apply(variables, x), f32.apply(variables, x), tol=3e-2, what="bf16 logits")
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32  # parameters stay float32
    remat = get_model("small_cnn", input_size=64, remat=True)

    def loss(m):
        return lambda p: jnp.sum(m.apply_train({**variables, "params": p}, x)[0] ** 2)

    g1 = jax.grad(loss(f32))(variables["params"])
    g2 = jax.grad(loss(remat))(variables["params"])
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch,opts", [("small_cnn", dict(num_classes=7, input_size=64)), ("mlp2", {})])
def test_checkpoint_round_trip_is_exact(tmp_path, arch, opts):
    model = get_model(arch, **opts)
    variables = model.init(jax.random.PRNGKey(2))
    path = save_model(str(tmp_path / "m"), model, variables, source="test")
    loaded, restored = load_model(path)
    assert loaded.name == arch and loaded.num_classes == model.num_classes
    x = np.random.default_rng(0).uniform(size=(3, *model.input_shape)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded.apply(restored, x)), np.asarray(model.apply(variables, x)))
    meta = json.load(open(os.path.join(path, "model.json")))
    assert meta["arch"] == arch and meta["num_params"] > 0
    with pytest.raises(AdvalignError, match="already exists"):
        save_model(path, model, variables)


def test_loading_the_wrong_thing(tmp_path):
    model = get_model("small_cnn", num_classes=7, input_size=64)
    path = save_model(str(tmp_path / "m"), model, model.init(jax.random.PRNGKey(0)))
    with pytest.raises(AdvalignError, match=r"holds a small_cnn \(7 classes\), not a mlp2"):
        load_model(path, arch="mlp2")
    with pytest.raises(AdvalignError, match="with 7 classes, not 10"):
        load_model(path, num_classes=10)
    with pytest.raises(AdvalignError, match="not a model directory"):
        load_model(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdvalignError, match="no model.json"):
        load_model(str(tmp_path / "empty"))
    # A model.json whose architecture does not match the stored variables: every mismatch listed.
    meta_path = os.path.join(path, "model.json")
    meta = json.load(open(meta_path))
    meta["options"]["widths"] = [8, 16, 32, 48]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(importers.ImportMismatch, match="mis-shaped"):
        load_model(path)


def test_safetensors_reader_against_the_safetensors_library(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "half": torch.randn(5).half(), "bf": torch.randn(2, 2).bfloat16()}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    got = importers.read_safetensors(str(tmp_path / "x.safetensors"))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v.float().numpy() if v.is_floating_point() else v.numpy())
    assert importers.detect_format(str(tmp_path / "x.safetensors")) == "safetensors"


def test_torch_reader_unwraps_state_dicts(tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "x.pth")
    family, got = importers.read_checkpoint(str(tmp_path / "x.pth"))
    assert family == "torch" and set(got) == set(net.state_dict())
    np.testing.assert_array_equal(got["0.weight"], net.state_dict()["0.weight"].numpy())


def test_keras_h5_reader_names(tmp_path):
    from advalign_jax.data.tf_env import import_tf

    import_tf()
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inp)
    x = keras.layers.BatchNormalization(name="bn_a")(x)
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    model.save(str(tmp_path / "m.h5"))
    family, got = importers.read_checkpoint(str(tmp_path / "m.h5"))
    assert family == "keras"
    assert set(got) == {"conv_a/kernel", "conv_a/bias", "bn_a/gamma", "bn_a/beta", "bn_a/moving_mean",
                        "bn_a/moving_variance", "head/kernel", "head/bias"}
    np.testing.assert_array_equal(got["conv_a/kernel"], model.get_layer("conv_a").kernel.numpy())
    model.save(str(tmp_path / "m.keras"))
    family, got2 = importers.read_checkpoint(str(tmp_path / "m.keras"))
    assert family == "keras" and set(got2) == set(got)
    model.save_weights(str(tmp_path / "m.weights.h5"))
    with pytest.raises(AdvalignError, match="unnamed"):
        importers.read_checkpoint(str(tmp_path / "m.weights.h5"))


def test_files_that_are_not_checkpoints(tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("just some text, not weights")
    code = main(["convert", "--arch", "small_cnn", "--from", str(text), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a checkpoint" in err and err.count("\n") == 0
    code = main(["convert", "--arch", "resnet9000", "--from", str(text), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown model 'resnet9000'" in err
    assert not (tmp_path / "o").exists()


def test_assemble_lists_every_mismatch():
    expected = {"params": {"a": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32),
                                 "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
                           "b": {"kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32)}}}
    rules = importers.torch_conv("a", "conv", bias=True) + [importers.Rule("params/b/kernel", "fc.weight", "dense_torch")]
    source = {"conv.weight": np.zeros((4, 2, 3, 3)), "conv.bias": np.zeros(5), "extra.weight": np.zeros(1),
              "x.num_batches_tracked": np.zeros(())}
    with pytest.raises(importers.ImportMismatch) as info:
        importers.assemble(rules, source, expected, ignore=("num_batches_tracked",))
    msg = str(info.value)
    assert "1 missing: fc.weight" in msg and "1 unexpected: extra.weight" in msg
    assert "conv.bias (5,) -> params/a/bias expects (4,)" in msg
    source["conv.bias"], source["fc.weight"] = np.zeros(4), np.ones((2, 4))
    del source["extra.weight"]
    out = importers.assemble(rules, source, expected, ignore=("num_batches_tracked",))
    assert out["params"]["b"]["kernel"].shape == (4, 2)


def test_patch_stem_is_the_strided_convolution(rng):
    """small_cnn's stem: reshape + matmul == lax.conv with kernel = stride = patch, VALID."""
    from advalign_jax.models.small import PatchStem

    x = rng.normal(size=(2, 37, 29, 3)).astype(np.float32)
    stem = PatchStem(5, 8)
    variables = stem.init(jax.random.PRNGKey(0), x)
    ours = np.asarray(stem.apply(variables, x))
    k, b = variables["params"]["kernel"], variables["params"]["bias"]
    want = jax.lax.conv_general_dilated(x, k, (8, 8), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    np.testing.assert_allclose(ours, np.asarray(want), rtol=1e-5, atol=1e-5)
