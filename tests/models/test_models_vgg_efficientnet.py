"""VGG-16 and EfficientNet-B0 against their originals.

- Keras: ``keras.applications.VGG16`` and ``EfficientNetB0`` (random weights, BN statistics and the
  Normalization layer's statistics randomised too), saved as ``.h5``, converted with the CLI, compared in
  float32 on the same [0, 1] input (Keras's own preprocessing written in front of it): logits, one
  activation per stage, the input-gradient of the true-class logit. EfficientNet also: a model that
  keras.applications builds with ``weights="imagenet"`` (its extra Rescaling; the weights file served
  locally), and a file with the efficientnet package's names (the harmonized release's format).
- PyTorch: plain torch.nn references with torchvision / timm names (tests/references/torch_vgg.py,
  tests/references/torch_efficientnet.py; their names and shapes equal timm 1.0's), saved as .safetensors and .pth.
- A converted checkpoint reloads bit-identically; a VGG state dict converted as EfficientNet fails with
  one line listing the mismatches.

VGG-16 at 224 costs ~15 GFLOPs per pass: batch 1, one forward+backward per framework and check, 224 only
for Keras (whose VGG16 takes nothing else), the PyTorch-named checks at 64-96 px. ReLU-network gradients: see
:func:`compare`.
"""

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax.cli.main import main
from advalign_jax.models import importers, load_model
from advalign_jax.models.base import NORMS
from advalign_jax.models.convert import import_weights
from model_checks import assert_close, random_images, rel_err

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
TOL = 1e-4


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def ours_fn(model):
    """A jitted ``(variables, x, label) -> (logits, {intermediate: value}, d logits[0, label] / d x)``:
    one forward+backward of our model (batch 1, inference mode)."""

    @jax.jit
    def run(variables, x, label):
        state = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}

        def f(x):
            logits, inter = model.module.apply(state, x, train=False, mutable=["intermediates"])
            return logits[0, label], (logits, inter["intermediates"])

        grad, (logits, inter) = jax.grad(f, has_aux=True)(x)
        return logits, {k: v[0] for k, v in inter.items()}, grad

    def call(variables, x, label):
        logits, inter, grad = run(variables, jnp.asarray(x), label)
        return np.asarray(logits), {k: np.asarray(v) for k, v in inter.items()}, np.asarray(grad)

    return call


def keras():
    from advalign_jax.data.tf_env import import_tf

    tf = import_tf()
    import keras as k

    return tf, k


def keras_all(kmodel, layer_names, fn_in, x, label):
    """(logits, [activations of layer_names], gradient) of a Keras model fed ``fn_in(x)``; one pass."""
    tf, k = keras()
    probe = k.Model(kmodel.inputs, [kmodel.get_layer(n).output for n in layer_names] + [kmodel.output])
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        outs = probe(fn_in(x), training=False)
        picked = outs[-1][0, label]
    grad = tape.gradient(picked, x).numpy()
    return outs[-1].numpy(), [o.numpy() for o in outs[:-1]], grad


def torch_all(net, x, label, norm=True):
    """(logits, [stage activations NHWC], gradient NHWC) of a torch reference taking ImageNet-normalised
    input; the normalisation is applied here so both sides differentiate w.r.t. the [0, 1] image."""
    import torch

    xt = torch.tensor(np.transpose(x, (0, 3, 1, 2)), requires_grad=True)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    logits, stages = net.forward_all((xt - mean) / std if norm else xt)
    (grad,) = torch.autograd.grad(logits[0, label], xt)
    return (logits.detach().numpy(), [np.transpose(s.detach().numpy(), (0, 2, 3, 1)) for s in stages],
            np.transpose(grad.numpy(), (0, 2, 3, 1)))


def compare(mine, ref, names, what, relu_gradient=False):
    """Logits, each intermediate and the input-gradient within TOL of the reference's scale; returns the
    errors (``grad_px_ok``: the fraction of pixels whose gradient is within TOL).

    ``relu_gradient``: the gradient of a deep ReLU + max-pool network is discontinuous; float32 rounding
    that differs between frameworks puts a few of VGG-16's ~14M pre-activations (or max-pool near-ties) at
    224x224 on the other side of their kink in every image, which changes the gradient by a few per cent
    over that unit's receptive field while all other pixels agree to ~1e-6. There at least 80 % of the
    pixels must agree within TOL (a wrong port disagrees nearly everywhere); the strict criterion is
    checked at smaller sizes, where such flips are rare."""
    (logits, inter, grad), (rlogits, rinter, rgrad) = mine, ref
    assert np.abs(rgrad).max() > 0 and np.abs(rlogits).max() > 0
    errors = {"logits": rel_err(logits, rlogits), "grad": rel_err(grad, rgrad)}
    assert_close(logits, rlogits, TOL, f"{what} logits")
    for name, r in zip(names, rinter):
        errors[name] = rel_err(inter[name], r)
        assert_close(inter[name], r, TOL, f"{what} {name}")
    if relu_gradient:
        per_pixel = np.abs(grad - rgrad).max(axis=-1) / np.abs(rgrad).max()
        errors["grad_px_ok"] = float(np.mean(per_pixel <= TOL))
        assert errors["grad_px_ok"] >= 0.8, f"{what} input-gradient: {errors}"
    else:
        assert_close(grad, rgrad, TOL, f"{what} input-gradient")
    return errors


def compare_retry(mine, ref, x, names, what, relu_gradient=False, tries=3):
    """:func:`compare` of ``mine(x)`` and ``ref(x)`` (each ``x -> (logits, stages, gradient)``); a ReLU
    network gets up to ``tries - 1`` more tries at copies of x jittered by 1e-3, in case a unit with a
    large receptive field lies within float32 rounding of its kink at x (see :func:`compare`; a wrong port
    fails at every point)."""
    rng, failures = np.random.default_rng(99), []
    for _ in range(tries):
        try:
            return compare(mine(x), ref(x), names, what, relu_gradient)
        except AssertionError as err:
            failures.append(str(err).splitlines()[0])
            x = np.clip(x + rng.normal(0, 1e-3, x.shape), 0, 1).astype(np.float32)
    raise AssertionError(f"{what}: {failures}")


def compare_torch(model, variables, net, x, label, names, what, relu_gradient=False):
    run = ours_fn(model)
    return compare_retry(lambda x: run(variables, x, label), lambda x: torch_all(net, x, label), x, names, what,
                         relu_gradient)


def randomize_keras(kmodel, seed):
    """Every weight random: He-scaled kernels, non-zero biases, BN gamma/beta/moving statistics away from
    their defaults, the Normalization layer's mean and variance."""
    _, k = keras()
    rng = np.random.default_rng(seed)
    for layer in kmodel.layers:
        for w in layer.weights:
            name, shape = w.name.split("/")[-1].split(":")[0], tuple(w.shape)
            if isinstance(layer, k.layers.Normalization):
                if name == "count":
                    continue
                value = rng.uniform(0.35, 0.55, shape) if name == "mean" else rng.uniform(0.04, 0.08, shape)
            elif name in ("kernel", "depthwise_kernel"):
                fan_in = np.prod(shape[:2]) if isinstance(layer, k.layers.DepthwiseConv2D) else np.prod(shape[:-1])
                value = rng.standard_normal(size=shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
            elif name in ("bias", "beta"):
                value = rng.normal(size=shape) * 0.1
            elif name == "gamma":
                value = 1 + 0.2 * rng.normal(size=shape)
            elif name == "moving_mean":
                value = 0.1 * rng.normal(size=shape)
            elif name == "moving_variance":
                value = rng.uniform(0.5, 1.5, shape)
            else:
                raise AssertionError(f"unexpected weight {layer.name}/{name}")
            w.assign(np.asarray(value, np.float32))
        if isinstance(layer, k.layers.Normalization):
            layer.finalize_state()  # what Keras does on loading: the layer computes with the stored statistics
    return kmodel


def convert_cli(source, arch, out, *extra):
    code = main(["convert", "--arch", arch, "--from", str(source), "--out", str(out), *extra])
    assert code == 0
    return load_model(str(out))


# ----------------------------------------------------------------------------------------------------
# EfficientNet-B0
# ----------------------------------------------------------------------------------------------------

EFF_STAGES = ["stem_activation", "block1a_project_bn", "block2b_add", "block3b_add", "block4c_add", "block5c_add",
              "block6d_add", "block7a_project_bn", "top_activation"]
EFF_OURS = ["stem_out"] + [f"stage{i}_out" for i in range(1, 8)] + ["top_out"]


@pytest.fixture(scope="module")
def keras_effnet(tmp_path_factory):
    """A randomised keras.applications EfficientNetB0 (200x200 input, so stride-2 convs meet even and odd
    sizes: 200, 100, 50, 25, 13) and its .h5."""
    _, k = keras()
    kmodel = randomize_keras(k.applications.EfficientNetB0(weights=None, input_shape=(200, 200, 3), classes=10,
                                                           classifier_activation=None), seed=1)
    path = tmp_path_factory.mktemp("effnet") / "effnet.h5"
    kmodel.save(str(path))
    return kmodel, path


def test_keras_efficientnet_b0(keras_effnet, tmp_path):
    kmodel, path = keras_effnet
    model, variables = convert_cli(path, "efficientnet_b0", tmp_path / "m")
    assert model.num_classes == 10 and model.options["padding"] == "tf" and model.options["bn_eps"] == 1e-3
    norm_layer = [l for l in kmodel.layers if l.name.startswith("normalization")][0]
    np.testing.assert_allclose(model.module.norm.mean, norm_layer.mean.numpy().ravel(), rtol=1e-6)
    x, label = random_images(0, 1, 200), 3
    run = ours_fn(model)
    mine = run(variables, x, label)
    ref = keras_all(kmodel, EFF_STAGES, lambda x: x * 255.0, x, label)
    errors = compare(mine, ref, EFF_OURS, "keras EfficientNetB0")
    print("keras EfficientNetB0 max errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    # The saved-and-reloaded checkpoint computes exactly what the in-memory import computes.
    family, weights = importers.read_checkpoint(str(path))
    model2, variables2 = import_weights(weights, family, "efficientnet_b0")
    assert model2.options == model.options
    again = run(variables2, x, label)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def write_keras2_h5(path, weights):
    """A Keras 2 style weights file (``model_weights`` group, ``layer/name:0`` weight names)."""
    layers = {}
    for key, value in weights.items():
        layer, weight = key.split("/")
        layers.setdefault(layer, []).append((weight, value))
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = [name.encode() for name in layers]
        for layer, ws in layers.items():
            group = root.create_group(layer)
            group.attrs["weight_names"] = [f"{layer}/{w}:0".encode() for w, _ in ws]
            for w, value in ws:
                group[f"{layer}/{w}:0"] = value


def test_keras_efficientnet_imagenet_build_and_package_names(keras_effnet, tmp_path, monkeypatch):
    """(1) keras.applications built with weights='imagenet' adds Rescaling(1/sqrt(std)) after its
    Normalization, whose released variance is [0.229, 0.224, 0.225]: Keras's own code path runs here, its
    weights file served locally. That model computes the network on (x - mean) / std, which is also what
    (2) the efficientnet package's model (qubvel; the harmonized EfficientNet-B0) computes with the
    harmonized 'imagenet' preprocessing: the same layers without preprocessing layers, the head named
    ``probs``, Keras 2's ``depthwise_kernel`` and ``:0`` names. Both imports are checked against it."""
    _, k = keras()
    import keras.src.applications.efficientnet as keras_effnet_module

    src, _ = keras_effnet
    donor = k.applications.EfficientNetB0(weights=None, classifier_activation=None)
    rng = np.random.default_rng(5)
    donor.set_weights(src.get_weights()[:-2] + [rng.normal(size=(1280, 1000)).astype(np.float32) * 0.05,
                                                rng.normal(size=1000).astype(np.float32) * 0.1])
    norm_layer = [l for l in donor.layers if isinstance(l, k.layers.Normalization)][0]
    norm_layer.set_weights([MEAN, STD, np.zeros((), np.int64)])  # the released statistics
    released = tmp_path / "released.h5"
    donor.save(str(released))
    monkeypatch.setattr(keras_effnet_module.file_utils, "get_file", lambda *a, **kw: str(released))
    kmodel = k.applications.EfficientNetB0(weights="imagenet", classifier_activation=None)
    assert sum(isinstance(l, k.layers.Rescaling) for l in kmodel.layers[:5]) == 2  # 1/255, 1/sqrt(std)
    x = random_images(1, 1, 224)
    ref = kmodel(x * 255.0, training=False).numpy()
    kmodel.save(str(tmp_path / "imagenet_built.h5"))
    family, weights = importers.read_checkpoint(str(tmp_path / "imagenet_built.h5"))
    built, built_variables = import_weights(weights, family, "efficientnet_b0")
    np.testing.assert_allclose(built.module.norm.mean, MEAN, rtol=1e-6)
    np.testing.assert_allclose(built.module.norm.std, STD, rtol=1e-6)  # sqrt(var) * sqrt(std) = std

    package = {}
    for key, value in weights.items():
        layer, weight = key.split("/")
        if isinstance(kmodel.get_layer(layer), k.layers.Normalization):
            continue
        if layer.endswith("_dwconv"):
            weight = "depthwise_kernel"
        package[f"{'probs' if layer == 'predictions' else layer}/{weight}"] = value
    write_keras2_h5(tmp_path / "package.h5", package)
    model, variables = convert_cli(tmp_path / "package.h5", "efficientnet_b0", tmp_path / "m")
    assert model.module.norm == NORMS["imagenet"] and model.num_classes == 1000
    assert {k: v for k, v in model.options.items() if k != "norm"} == \
        {k: v for k, v in built.options.items() if k != "norm"}
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(built_variables)):
        np.testing.assert_array_equal(a, b)
    err = rel_err(jax.jit(model.apply)(variables, x), ref)
    print(f"keras EfficientNetB0(weights='imagenet') / efficientnet-package names: logits max error {err:.1e}")
    assert err <= TOL


def test_timm_efficientnet_b0(tmp_path):
    import torch
    from safetensors.torch import save_file

    import torch_efficientnet

    net = torch_efficientnet.randomize(torch_efficientnet.EfficientNetB0(num_classes=7), seed=3)
    torch.save(net.state_dict(), tmp_path / "effnet.pth")
    save_file(net.state_dict(), str(tmp_path / "effnet.safetensors"))
    loaded = []
    for name in ("effnet.pth", "effnet.safetensors"):
        family, weights = importers.read_checkpoint(str(tmp_path / name))
        assert family == "torch"
        loaded.append(import_weights(weights, family, "efficientnet_b0", what=name))
    (model, variables), (_, variables2) = loaded
    assert model.options["padding"] == "torch" and model.options["bn_eps"] == 1e-5 and model.num_classes == 7
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2)):
        np.testing.assert_array_equal(a, b)
    errors = compare_torch(model, variables, net, random_images(3, 1, 200), 2, EFF_OURS, "timm-named EfficientNet")
    print("timm-named EfficientNet-B0 max errors:", {k: f"{v:.1e}" for k, v in errors.items()})


# ----------------------------------------------------------------------------------------------------
# VGG-16
# ----------------------------------------------------------------------------------------------------

VGG_KERAS = [f"block{s}_pool" for s in range(1, 6)] + ["fc2"]
VGG_OURS = [f"block{s}_out" for s in range(1, 6)] + ["fc2_out"]


def test_keras_vgg16(tmp_path):
    tf, k = keras()
    kmodel = randomize_keras(k.applications.VGG16(weights=None, classifier_activation=None), seed=2)
    kmodel.save(str(tmp_path / "vgg16.h5"))
    model, variables = convert_cli(tmp_path / "vgg16.h5", "vgg16", tmp_path / "m", "--norm", "caffe")
    assert model.options["head"] == "keras" and model.module.norm == NORMS["caffe"]
    x, label = random_images(4, 1, 224), 7
    caffe = tf.constant([103.939, 116.779, 123.68])  # keras 'caffe' preprocess_input: RGB->BGR, minus means
    run = ours_fn(model)
    errors = compare_retry(lambda x: run(variables, x, label),
                           lambda x: keras_all(kmodel, VGG_KERAS, lambda x: tf.reverse(x * 255.0, axis=[-1]) - caffe,
                                               x, label), x, VGG_OURS, "keras VGG16", relu_gradient=True)
    print("keras VGG16 max errors:", {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.fixture(scope="module")
def small_vgg16(tmp_path_factory):
    """A randomised torchvision-named VGG16 with a 64-wide head (10 classes; the convolutional part at
    full size) and its .safetensors: the names and head semantics at a fraction of the cost."""
    from safetensors.torch import save_file

    import torch_vgg

    net = torch_vgg.randomize(torch_vgg.VGG(num_classes=10, hidden=64), seed=4)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file(net.state_dict(), str(path))
    return net, path


def test_vgg16_torchvision_and_timm_names_at_other_sizes(small_vgg16):
    """torchvision names from .safetensors at 96x96: the 3x3 features are adaptive-pooled to 7x7
    (overlapping bins) before the (C, H, W) flatten. The same weights under timm's names (7x7-conv fc1,
    1x1-conv fc2, ``head.fc``) give the same variables, and with timm's head at 64x64 (2x2 features pooled
    up to 7x7, then the conv and a global mean) match a timm-layout reference. Logits, stages and strict
    input-gradients."""
    import torch

    import torch_vgg

    net, path = small_vgg16
    family, weights = importers.read_checkpoint(str(path))
    model, variables = import_weights(weights, family, "vgg16", input_size=96)
    assert model.options["head"] == "torchvision" and model.options["hidden"] == 64 and model.num_classes == 10
    errors = compare_torch(model, variables, net, random_images(5, 1, 96), 4, VGG_OURS[:5], "torchvision VGG16 at 96")
    print("torchvision VGG16 at 96 max errors:", {k: f"{v:.1e}" for k, v in errors.items()})

    timm = {k: v for k, v in weights.items() if k.startswith("features.")}
    timm["pre_logits.fc1.weight"] = weights["classifier.0.weight"].reshape(64, 512, 7, 7)
    timm["pre_logits.fc2.weight"] = weights["classifier.3.weight"].reshape(64, 64, 1, 1)
    timm["head.fc.weight"] = weights["classifier.6.weight"]
    for src, dst in (("classifier.0", "pre_logits.fc1"), ("classifier.3", "pre_logits.fc2"),
                     ("classifier.6", "head.fc")):
        timm[f"{dst}.bias"] = weights[f"{src}.bias"]
    tmodel, tvariables = import_weights(timm, "torch", "vgg16", input_size=64)
    assert tmodel.options["head"] == "timm" and tmodel.options["hidden"] == 64
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(tvariables)):
        np.testing.assert_array_equal(a, b)
    tnet = torch_vgg.VGG(num_classes=10, head="timm", hidden=64)
    tnet.load_state_dict({k: torch.from_numpy(v) for k, v in timm.items()})
    errors = compare_torch(tmodel, tvariables, tnet.eval(), random_images(6, 1, 64), 2, VGG_OURS[:5],
                            "timm VGG16 at 64")
    print("timm-named VGG16 at 64 max errors:", {k: f"{v:.1e}" for k, v in errors.items()})


def test_torchvision_vgg16_bn(tmp_path):
    """torchvision VGG16-BN at full size (4096-wide head) from a .pth, at 80x80 (the max-pools floor 5 to 2;
    224 is covered by the Keras test, whose head computes the same): logits, stages, strict gradient."""
    import torch

    import torch_vgg

    net = torch_vgg.randomize(torch_vgg.VGG(batch_norm=True, num_classes=10), seed=6)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "vgg16_bn.pth")
    family, weights = importers.read_checkpoint(str(tmp_path / "vgg16_bn.pth"))
    model, variables = import_weights(weights, family, "vgg16_bn", input_size=80)
    assert model.options["head"] == "torchvision" and model.options["hidden"] == 4096
    errors = compare_torch(model, variables, net, random_images(7, 1, 80), 1, VGG_OURS[:5], "torchvision VGG16-BN")
    print("torchvision VGG16-BN max errors:", {k: f"{v:.1e}" for k, v in errors.items()})


def test_vgg_state_dict_as_efficientnet_fails_in_one_line(small_vgg16, tmp_path, capsys):
    _, path = small_vgg16
    code = main(["convert", "--arch", "efficientnet_b0", "--from", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "missing: conv_stem.weight" in err and "unexpected: classifier.0.bias" in err, err
    assert not (tmp_path / "o").exists()
