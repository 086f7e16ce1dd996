"""ViT-B/16, S/16, Ti/16 and ConvNeXt-Tiny against their originals (float32, tests/references/model_checks.py criteria).

- ViT, timm names: a plain torch.nn ViT with timm's parameter names (tests/references/torch_vit.py), ViT-Ti/16 at
  64 px (16 patches; the position-embedding grid is read off the checkpoint), converted through the CLI;
  logits, the embedding and three block outputs, the input-gradient. S/16 and B/16 state dicts with the
  real names and shapes import; the ``global_pool='avg'`` variant matches.
- ViT, vit_keras layout (the harmonized ViT-B/16 format): a Keras 3 ViT with vit_keras's architecture
  (tests/references/keras_vit.py), its weights written as tf.keras 2 writes a vit_keras model (``/`` in layer
  names, which Keras 3 cannot save); and, where the vit_keras package is installed, vit_keras itself
  saved by Keras 3.
- ConvNeXt-Tiny: ``keras.applications.ConvNeXtTiny`` (random weights, layer scales included, its
  built-in preprocessing in front) saved as .h5; the same weights in kecam's layout (the harmonized
  ConvNeXt-Tiny format); where keras-cv-attention-models is installed, its own ConvNeXtTiny; and a
  plain torch.nn ConvNeXt with timm's names (tests/references/torch_convnext.py). ConvNeXt is size-agnostic, so
  the checks use 64 px.
- A converted checkpoint saved and reloaded gives identical outputs; a ViT-Ti/16 state dict converted
  as vit_b16 exits 2 with one line listing the mis-shaped tensors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import keras_convnext
import keras_vit
import torch_convnext
import torch_vit
from advalign_jax.cli.main import main
from advalign_jax.models import load_model, save_model
from advalign_jax.models.base import NORMS, get_norm
from advalign_jax.models.convert import import_weights
from model_checks import assert_close, random_images, tf_true_class_grad, torch_true_class_grad

MEAN = np.float32([0.485, 0.456, 0.406])
STD = np.float32([0.229, 0.224, 0.225])


def _keras():
    from advalign_jax.data.tf_env import import_tf

    import_tf()
    import keras

    return keras


def convert_cli(tmp_path, source, arch, name="model"):
    out = tmp_path / name
    assert main(["convert", "--arch", arch, "--from", str(source), "--out", str(out)]) == 0
    return load_model(str(out))


def evaluate(model, variables, x, labels):
    """(logits, {intermediate: activation}, d sum_i logits[i, labels[i]] / dx) of our model in inference
    mode, from one forward and one backward pass (eagerly: no compilation, which would cost more here)."""
    params = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}

    def f(x):
        logits, state = model.module.apply(params, x, train=False, mutable=["intermediates"])
        return logits.astype(jnp.float32), state["intermediates"]

    (logits, inter), vjp = jax.vjp(f, jnp.asarray(x))
    (grad,) = vjp((jax.nn.one_hot(np.asarray(labels), logits.shape[-1], dtype=jnp.float32),
                   jax.tree.map(jnp.zeros_like, inter)))
    return np.asarray(logits), {k: np.asarray(v[0]) for k, v in inter.items()}, np.asarray(grad)


def torch_state(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# ViT, timm names
# ----------------------------------------------------------------------------------------------------

def test_vit_ti16_matches_torch_reference_and_round_trips(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = torch_vit.randomize_(torch_vit.vit("vit_ti16", img_size=64, num_classes=10), seed=1).eval()
    save_file(ref.state_dict(), str(tmp_path / "vit.safetensors"))
    model, variables = convert_cli(tmp_path, tmp_path / "vit.safetensors", "vit_ti16")
    assert (model.input_size, model.num_classes, get_norm(model.options["norm"])) == (64, 10, NORMS["half"])

    x, labels = random_images(0, 2, 64), np.array([3, 7])
    grad_ref, logits_ref = torch_true_class_grad(lambda t: ref((t - 0.5) / 0.5), x, labels)
    with torch.no_grad():
        embed, blocks = ref.forward_tokens(torch.tensor(np.transpose((x - 0.5) / 0.5, (0, 3, 1, 2))))
    logits, inter, grad = evaluate(model, variables, x, labels)
    assert_close(inter["embed_out"], embed.numpy(), what="embed_out")
    for i in (0, 5, 11):
        assert_close(inter[f"block{i}_out"], blocks[i].numpy(), what=f"block{i}_out")
    assert_close(logits, logits_ref, what="logits")
    assert_close(grad, grad_ref, what="input gradient")

    # The checkpoint on disk reproduces the in-memory import exactly, and so does a second save/load.
    fresh_model, fresh = import_weights(torch_state(ref), "torch", "vit_ti16")
    np.testing.assert_array_equal(np.asarray(fresh_model.apply(fresh, x)), logits)
    again, again_vars = load_model(save_model(str(tmp_path / "again"), model, variables))
    np.testing.assert_array_equal(np.asarray(again.apply(again_vars, x)), logits)


@pytest.mark.parametrize("arch", ["vit_s16", "vit_b16"])
def test_vit_state_dicts_with_real_names_and_shapes_import(arch):
    with torch.device("meta"):
        ref = torch_vit.vit(arch)  # 224 px, 1000 classes: timm's names and shapes, no data
    rng = np.random.default_rng(0)
    state = {k: (rng.standard_normal(v.shape).astype(np.float32) if k.startswith(("blocks.11.attn.qkv", "pos_embed"))
                 else np.zeros(v.shape, np.float32)) for k, v in ref.state_dict().items()}
    model, variables = import_weights(state, "torch", arch)
    assert (model.input_size, model.num_classes, model.options["pool"]) == (224, 1000, "token")
    width = torch_vit.VARIANTS[arch][0]
    qkv_w, qkv_b = state["blocks.11.attn.qkv.weight"], state["blocks.11.attn.qkv.bias"]
    attn = variables["params"]["block11"]["attn"]
    for j, part in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(attn[part]["kernel"], qkv_w[j * width:(j + 1) * width].T)
        np.testing.assert_array_equal(attn[part]["bias"], qkv_b[j * width:(j + 1) * width])
    np.testing.assert_array_equal(variables["params"]["pos_embed"], state["pos_embed"])


def test_vit_avg_pool_variant_matches_torch_reference():
    torch.manual_seed(2)
    ref = torch_vit.randomize_(torch_vit.vit("vit_ti16", img_size=64, num_classes=10, global_pool="avg"), 3).eval()
    model, variables = import_weights(torch_state(ref), "torch", "vit_ti16")
    assert model.options["pool"] == "avg" and model.input_size == 64
    x = random_images(4, 2, 64)
    with torch.no_grad():
        want = ref(torch.tensor(np.transpose((x - 0.5) / 0.5, (0, 3, 1, 2)))).numpy()
    assert_close(model.apply(variables, x), want, what="avg-pool logits")


def test_vit_ti16_state_dict_as_vit_b16_exits_2_listing_mis_shaped_tensors(tmp_path, capsys):
    torch.save(torch_vit.vit("vit_ti16", img_size=32).state_dict(), tmp_path / "ti.pth")
    code = main(["convert", "--arch", "vit_b16", "--from", str(tmp_path / "ti.pth"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "mis-shaped" in err and "patch_embed.proj.weight (16, 16, 3, 192)" in err
    assert "expects (16, 16, 3, 768)" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------
# ViT, vit_keras layout
# ----------------------------------------------------------------------------------------------------

def _keras_vit_check(keras, model, variables, logits_model, blocks_model, x, labels, tol=1e-4):
    grad_ref, logits_ref = tf_true_class_grad(lambda t: logits_model((t - MEAN) / STD), x, labels)
    logits, inter, grad = evaluate(model, variables, x, labels)
    assert_close(logits, logits_ref, tol, what="logits")
    assert_close(grad, grad_ref, tol, what="input gradient")
    if blocks_model is not None:
        blocks = [np.asarray(b) for b in blocks_model((x - MEAN) / STD)]
        assert_close(inter["embed_out"], blocks[0], tol, what="embed_out")
        for i in (0, 11):
            assert_close(inter[f"block{i}_out"], blocks[i + 1], tol, what=f"block{i}_out")


def test_vit_keras_layout_h5_matches_keras_reference(tmp_path):
    keras = _keras()
    keras.utils.set_random_seed(0)
    logits_model, blocks_model = keras_vit.build_reference(keras, 64, 16, 12, 192, 3, 768, 10)
    keras_vit.randomize(logits_model, seed=5)
    keras_vit.write_keras2_h5(str(tmp_path / "vit.h5"), keras_vit.vit_keras_groups(logits_model, 12))
    model, variables = convert_cli(tmp_path, tmp_path / "vit.h5", "vit_ti16")
    assert (model.input_size, model.num_classes, get_norm(model.options["norm"])) == (64, 10, NORMS["imagenet"])
    _keras_vit_check(keras, model, variables, logits_model, blocks_model, random_images(6, 2, 64), [1, 8])


def test_vit_keras_library_h5_matches(tmp_path):
    """vit_keras itself (0.2, the Keras 3 port: ``Transformer_encoderblock_0``-style names)."""
    vit = pytest.importorskip("vit_keras.vit", reason="the vit_keras package is not installed")
    keras = _keras()
    keras.utils.set_random_seed(2)
    km = vit.build_model(image_size=64, patch_size=16, num_layers=12, hidden_size=192, num_heads=3,
                         name="vit-ti16", mlp_dim=768, classes=10, dropout=0.0)
    keras_vit.randomize(km, seed=11)
    km.save(str(tmp_path / "vk.h5"))
    model, variables = convert_cli(tmp_path, tmp_path / "vk.h5", "vit_ti16")
    assert (model.input_size, model.num_classes) == (64, 10)
    _keras_vit_check(keras, model, variables, km, None, random_images(12, 2, 64), [0, 5])


# ----------------------------------------------------------------------------------------------------
# ConvNeXt-Tiny
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_convnext_ref(tmp_path_factory):
    """keras.applications.ConvNeXtTiny (64 px, 10 classes, random weights) saved as .h5, with its
    reference outputs on a random [0, 1] input (the model's own Normalization sees x * 255)."""
    keras = _keras()
    keras.utils.set_random_seed(1)
    km = keras.applications.ConvNeXtTiny(weights=None, input_shape=(64, 64, 3), classes=10,
                                         classifier_activation=None)
    keras_convnext.randomize(km, seed=7)
    path = tmp_path_factory.mktemp("cnx") / "convnext.h5"
    km.save(str(path))
    x, labels = random_images(8, 2, 64), np.array([2, 9])
    grad, logits = tf_true_class_grad(lambda t: km(t * 255.0), x, labels)
    stages = [np.asarray(a) for a in keras_convnext.stage_outputs(keras, km)(x * 255.0)]
    return dict(keras=km, path=path, x=x, labels=labels, grad=grad, logits=logits, stages=stages)


def _convnext_check(model, variables, x, labels, logits_ref, grad_ref, stages_ref=None):
    logits, inter, grad = evaluate(model, variables, x, labels)
    for name, ref in zip(["stem_out"] + [f"stage{i}_out" for i in range(4)], stages_ref or []):
        assert_close(inter[name], ref, what=name)
    assert_close(logits, logits_ref, what="logits")
    assert_close(grad, grad_ref, what="input gradient")


def test_convnext_keras_applications_h5_matches(tmp_path, keras_convnext_ref):
    r = keras_convnext_ref
    model, variables = convert_cli(tmp_path, r["path"], "convnext_tiny")
    norm = get_norm(model.options["norm"])
    assert model.num_classes == 10 and norm.scale == 255.0  # Keras's own 0..255 Normalization layer
    np.testing.assert_allclose(norm.mean, 255 * MEAN, rtol=1e-6)
    _convnext_check(model, variables, r["x"], r["labels"], r["logits"], r["grad"], r["stages"][:5])


def test_convnext_kecam_layout_h5_matches(tmp_path, keras_convnext_ref):
    r = keras_convnext_ref
    keras_vit.write_keras2_h5(str(tmp_path / "kecam.h5"), keras_convnext.kecam_groups(r["keras"]))
    model, variables = convert_cli(tmp_path, tmp_path / "kecam.h5", "convnext_tiny")
    assert model.num_classes == 10 and get_norm(model.options["norm"]) == NORMS["imagenet"]
    # kecam models have no preprocessing layer: the harmonized (x - mean) / std is the model's norm,
    # the same function as keras.applications' Normalization of x * 255.
    _convnext_check(model, variables, r["x"], r["labels"], r["logits"], r["grad"])


def test_convnext_kecam_library_h5_matches(tmp_path):
    """kecam's own ConvNeXtTiny saved by Keras 3 (depthwise kernels named ``kernel``)."""
    kecam = pytest.importorskip("keras_cv_attention_models.convnext",
                                reason="keras-cv-attention-models is not installed")
    keras = _keras()
    keras.utils.set_random_seed(3)
    km = kecam.ConvNeXtTiny(input_shape=(64, 64, 3), num_classes=10, pretrained=None, classifier_activation=None)
    keras_convnext.randomize(km, seed=13)
    km.save(str(tmp_path / "kecam.h5"))
    model, variables = convert_cli(tmp_path, tmp_path / "kecam.h5", "convnext_tiny")
    assert model.num_classes == 10 and get_norm(model.options["norm"]) == NORMS["imagenet"]
    x, labels = random_images(14, 2, 64), np.array([6, 1])
    grad_ref, logits_ref = tf_true_class_grad(lambda t: km((t - MEAN) / STD), x, labels)
    _convnext_check(model, variables, x, labels, logits_ref, grad_ref)


def test_convnext_matches_torch_reference(tmp_path):
    torch.manual_seed(3)
    ref = torch_convnext.randomize_(torch_convnext.ConvNeXt(num_classes=10), seed=4).eval()
    torch.save(ref.state_dict(), tmp_path / "convnext.pth")
    model, variables = convert_cli(tmp_path, tmp_path / "convnext.pth", "convnext_tiny")
    assert model.num_classes == 10 and get_norm(model.options["norm"]) == NORMS["imagenet"]
    x, labels = random_images(9, 2, 64), np.array([0, 4])
    fn = lambda t: ref((t - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])  # noqa: E731
    grad_ref, logits_ref = torch_true_class_grad(fn, x, labels)
    with torch.no_grad():
        stem, stages = ref.forward_features(torch.tensor(np.transpose((x - MEAN) / STD, (0, 3, 1, 2))))
    nhwc = [np.transpose(t.numpy(), (0, 2, 3, 1)) for t in [stem, *stages]]
    _convnext_check(model, variables, x, labels, logits_ref, grad_ref, nhwc)


def test_convnext_stochastic_depth_only_in_training():
    from advalign_jax.models import get_model

    small = dict(num_classes=3, input_size=32, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))  # fast
    model = get_model("convnext_tiny", drop_path_rate=0.5, **small)
    rng = np.random.default_rng(0)  # random variables without model.init's per-shape compilations
    variables = jax.tree.map(lambda s: (0.5 + 0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                             model.variable_shapes())
    x = random_images(10, 4, 32)
    a = np.asarray(model.apply(variables, x))
    plain = get_model("convnext_tiny", **small)
    np.testing.assert_allclose(np.asarray(plain.apply(variables, x)), a, rtol=1e-6, atol=1e-6)
    t1, _ = model.apply_train(variables, x, rng=jax.random.PRNGKey(1))
    t2, _ = model.apply_train(variables, x, rng=jax.random.PRNGKey(2))
    assert not np.allclose(t1, a, atol=1e-4) and not np.allclose(t1, t2, atol=1e-4)
    np.testing.assert_allclose(np.asarray(plain.apply_train(variables, x)[0]), a, rtol=1e-5, atol=1e-5)
