"""ResNet family against its originals.

- ``resnet50_keras`` / ``resnet50v2`` against ``keras.applications.ResNet50`` / ``ResNet50V2`` built with
  random weights (BatchNorm statistics and biases randomised too), saved as ``.h5`` and converted through
  the CLI: logits, the output of every stage (conv2..conv5) and the input-gradient of the true-class
  logit, each on the same [0, 1] input with Keras's own preprocessing written out in front of the Keras
  model ('caffe' for ResNet50, 'tf' for ResNet50V2, which we convert with ``--norm inception``).
- ``resnet18`` against the plain torch.nn ResNet of ``torch_resnet.py`` (torchvision names): logits and
  input-gradient; state dicts of resnet18/34/50/101 import from ``.pth`` and ``.safetensors``.
- Bad input through the CLI and ``load_model``; checkpoint round trip; bfloat16 and remat.

Test speed: compiled with XLA's CPU backend optimisations off (``FAST_COMPILE``).

Inputs are 65x65 (odd feature maps at every stage, 33-17-9-5-3, exercise every stride-2 padding; the
heads pool globally), batch 2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax.cli.main import main
from advalign_jax.errors import AdvalignError
from advalign_jax.models import NORMS, get_def, load_model
from advalign_jax.models import importers
from advalign_jax.models.convert import import_weights
from model_checks import assert_close, random_images, rel_err, tf_true_class_grad, torch_true_class_grad

SIZE = 65
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

# XLA's CPU backend optimisations off: compiling a ResNet-50 input-gradient takes ~2.5 s instead of ~7 s;
# the computation is the same (no fast-math either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_fast(fn):
    """``jax.jit(fn)`` compiled with :data:`FAST_COMPILE`, once per argument shapes."""
    jitted, cache = jax.jit(fn), {}

    def call(*args):
        key = str(jax.tree.map(lambda a: (np.shape(a), str(np.asarray(a).dtype)), args))
        if key not in cache:
            cache[key] = jitted.lower(*args).compile(compiler_options=FAST_COMPILE)
        return jax.tree.map(np.asarray, cache[key](*args))

    return call


def ours(model):
    """``(variables, x, labels) -> (logits, {stage: activation}, input-gradient of the true-class
    logit)`` for ``model``, inference mode, one compiled pass."""

    def run(state, x, labels):
        def f(x):
            logits, inter = model.module.apply(state, x, train=False, mutable=["intermediates"])
            picked = jnp.sum(jnp.take_along_axis(logits, labels[:, None], axis=1))
            return picked, (logits, inter["intermediates"])

        (_, (logits, inter)), grad = jax.value_and_grad(f, has_aux=True)(x)
        return logits, {k: v[0] for k, v in inter.items() if k != "features"}, grad  # stages only

    compiled = compile_fast(run)
    return lambda variables, x, labels: compiled({k: variables[k] for k in ("params", "batch_stats")},
                                                 np.asarray(x, np.float32), np.asarray(labels))


def check_input_gradient(ours_grad, ref_grad, x, what, tries=4, tol=1e-4):
    """Input-gradients within ``tol`` relative, per image.

    The gradient of a ReLU network is discontinuous. Float32 rounding that differs between frameworks
    (convolution algorithms, summation order) can put a pre-activation that is exactly within ~1e-6 of
    zero (e.g. 2.7e-7 among activations of order 1, found in float64) on different sides of it; that
    image's gradient then differs by 0.1-8 % around one spot (as much as PyTorch's own float32 gradient
    differs from its float64 one at such a point), while the other images agree to ~1e-6. This happens
    to a few per cent of 65-px images (more at 224 px). So each image must agree at its own point or at
    one of ``tries - 1`` copies jittered by 1e-3; a wrong port disagrees at all of them. Returns the
    per-image error where it agreed.
    """
    rng = np.random.default_rng(1234)
    errors = [[] for _ in range(len(x))]
    xk = x
    for _ in range(tries):
        g, r = ours_grad(xk), ref_grad(xk)
        for b in range(len(x)):
            if not errors[b] or errors[b][-1] > tol:
                errors[b].append(rel_err(g[b], r[b]))
        if all(e[-1] <= tol for e in errors):
            return [e[-1] for e in errors]
        xk = np.clip(x + rng.normal(0, 1e-3, x.shape), 0, 1).astype(np.float32)
    raise AssertionError(f"{what}: per-image errors at the point and its jittered copies {errors} "
                         f"(tolerance {tol:.0e})")


def convert_cli(tmp_path, arch, source, *extra):
    out = str(tmp_path / arch)
    assert main(["convert", "--arch", arch, "--from", str(source), "--out", out, *extra]) == 0
    return out


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def randomize_keras(model, seed):
    """Random kernels (He scale), biases, BN gamma/beta and moving statistics for every layer."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            name, shape = w.path.split("/")[-1], tuple(w.shape)
            if name == "kernel":
                values.append(rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape))
            elif name in ("bias", "beta"):
                values.append(rng.normal(0, 0.1, shape))
            elif name == "gamma":
                values.append(rng.uniform(0.4, 1.2, shape))
            elif name == "moving_mean":
                values.append(rng.normal(0, 0.2, shape))
            elif name == "moving_variance":
                values.append(rng.uniform(0.5, 2.0, shape))
            else:
                raise AssertionError(f"unexpected weight {w.path}")
        if values:
            layer.set_weights([v.astype(np.float32) for v in values])


def keras_check(tmp_path, build, arch, preprocess, stage_layers, extra=()):
    """Build a random Keras model, convert its .h5 through the CLI and compare everything."""
    from advalign_jax.data.tf_env import import_tf

    tf = import_tf()
    import keras

    net = build(weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    randomize_keras(net, seed=0)
    net.save(str(tmp_path / "net.h5"))
    model, variables = load_model(convert_cli(tmp_path, arch, tmp_path / "net.h5", *extra))

    x = random_images(0, 2, SIZE)
    labels = np.array([3, 917])
    probe = keras.Model(net.inputs, [net.get_layer(n).output for n in stage_layers])
    ref_stages = [np.asarray(a) for a in probe(preprocess(tf, tf.constant(x)))]
    ref_logits = np.asarray(net(preprocess(tf, tf.constant(x))))

    run = ours(model)
    logits, inter, _ = run(variables, x, labels)
    scale = float(np.max(np.abs(ref_logits)))
    assert scale > 1.0 and np.std(ref_logits) > 0.05 * scale  # a non-degenerate test
    assert_close(logits, ref_logits, what=f"{arch} logits")
    assert len(inter) == len(stage_layers)
    for (name, act), ref in zip(sorted(inter.items()), ref_stages):
        assert_close(act, ref, what=f"{arch} {name}")
    reference = lambda t: net(preprocess(tf, t))  # noqa: E731
    grad_errors = check_input_gradient(lambda xk: run(variables, xk, labels)[2],
                                       lambda xk: tf_true_class_grad(reference, xk, labels)[0],
                                       x, what=f"{arch} input-gradient")
    stage_errors = [f"{rel_err(inter[n], r):.1e}" for n, r in zip(sorted(inter), ref_stages)]
    print(f"{arch}: logits {rel_err(logits, ref_logits):.1e}, stages {stage_errors}, "
          f"input-gradient {[f'{e:.1e}' for e in grad_errors]}")
    return model


# ----------------------------------------------------------------------------------------------------
# Keras originals
# ----------------------------------------------------------------------------------------------------

def test_keras_resnet50(tmp_path):
    import keras

    def caffe(tf, x):  # keras.applications.resnet50.preprocess_input: RGB->BGR, 0..255, minus means
        return tf.reverse(x * 255.0, axis=[-1]) - tf.constant([103.939, 116.779, 123.68])

    model = keras_check(tmp_path, keras.applications.ResNet50, "resnet50_keras", caffe,
                        [f"conv{s}_block{n}_out" for s, n in ((2, 3), (3, 4), (4, 6), (5, 3))])
    assert model.options["norm"] == "caffe" and model.module.norm == NORMS["caffe"]  # the importer's default


def test_keras_resnet50v2(tmp_path):
    import keras

    def tf_mode(tf, x):  # keras.applications.resnet_v2.preprocess_input ('tf'): x/127.5 - 1 on 0..255
        return x * 255.0 / 127.5 - 1.0

    keras_check(tmp_path, keras.applications.ResNet50V2, "resnet50v2", tf_mode,
                [f"conv{s}_block{n}_out" for s, n in ((2, 3), (3, 4), (4, 6), (5, 3))],
                extra=("--norm", "inception"))
    # Without --norm, the harmonized release's convention: (x - mean) / std.
    assert get_def("resnet50v2").importers["keras"].norm == "imagenet"


# ----------------------------------------------------------------------------------------------------
# PyTorch naming
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    """{name: (.pth path, .safetensors path)} of random torchvision-named ResNets; and the resnet18 net."""
    import torch
    from safetensors.torch import save_file

    import torch_resnet

    d = tmp_path_factory.mktemp("torch_resnets")
    files, nets = {}, {}
    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        net = torch_resnet.resnet(name, randomize_bn=name == "resnet18")
        sd = net.state_dict()
        torch.save(sd, d / f"{name}.pth")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / f"{name}.safetensors"))
        files[name] = (d / f"{name}.pth", d / f"{name}.safetensors")
        if name == "resnet18":
            nets[name] = net
    return files, nets


@pytest.fixture(scope="module")
def resnet18_dir(torch_files, tmp_path_factory):
    files, _ = torch_files
    return convert_cli(tmp_path_factory.mktemp("r18"), "resnet18", files["resnet18"][0])


@pytest.fixture(scope="module")
def resnet18_loaded(resnet18_dir):
    """(model, variables, compiled ``ours``) of the converted resnet18."""
    model, variables = load_model(resnet18_dir)
    return model, variables, ours(model)


def test_torch_resnet18_matches_the_reference(torch_files, resnet18_loaded):
    import torch

    files, nets = torch_files
    net = nets["resnet18"]
    model, variables, run = resnet18_loaded
    assert model.num_classes == 1000 and model.module.norm == NORMS["imagenet"]
    x = random_images(1, 2, SIZE)
    labels = np.array([7, 123])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    reference = lambda t: net((t - mean) / std)  # noqa: E731
    logits, inter, _ = run(variables, x, labels)
    with torch.no_grad():
        h = torch.tensor(x).permute(0, 3, 1, 2)
        logit_error = rel_err(logits, reference(h).numpy())
        assert_close(logits, reference(h).numpy(), what="resnet18 logits")
        h = net.maxpool(torch.relu(net.bn1(net.conv1((h - mean) / std))))
        for s in range(1, 5):
            h = getattr(net, f"layer{s}")(h)
            assert_close(inter[f"layer{s}_out"], h.permute(0, 2, 3, 1).numpy(), what=f"resnet18 layer{s}")
    grad_errors = check_input_gradient(lambda xk: run(variables, xk, labels)[2],
                                       lambda xk: torch_true_class_grad(reference, xk, labels)[0], x,
                                       what="resnet18 input-gradient")
    print(f"resnet18: logits {logit_error:.1e}, input-gradient {[f'{e:.1e}' for e in grad_errors]}")

    # The converted directory, reloaded, gives exactly what the in-memory import of the same weights gives.
    _, in_memory = import_weights(importers.read_checkpoint(str(files["resnet18"][1]))[1], "torch", "resnet18")
    np.testing.assert_array_equal(logits, run(in_memory, x, labels)[0])


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_torchvision_state_dicts_import(torch_files, name):
    files, _ = torch_files
    for path in files[name]:
        family, weights = importers.read_checkpoint(str(path))
        assert family == "torch"
        model, variables = import_weights(weights, family, name, what=str(path), input_size=32)
        assert model.num_classes == 1000
        np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], weights["fc.weight"].T)
        np.testing.assert_array_equal(variables["batch_stats"]["layer4_1"]["bn2"]["var"],
                                      weights["layer4.1.bn2.running_var"])


def test_wrong_checkpoints_through_the_cli(torch_files, resnet18_dir, tmp_path, capsys):
    files, _ = torch_files
    # A resnet18 state dict as resnet50: one line listing the missing and mis-shaped tensors.
    out = tmp_path / "o"
    assert main(["convert", "--arch", "resnet50", "--from", str(files["resnet18"][0]), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "missing: layer1.0.conv3.weight" in err and "mis-shaped" in err and "(as resnet50)" in err
    # ... and the other way round: the extra tensors are listed as unexpected.
    assert main(["convert", "--arch", "resnet18", "--from", str(files["resnet50"][1]), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "165 unexpected: layer1.0.bn3.bias;" in err and "layer1.0.conv3.weight" in err and "mis-shaped" in err
    # --num-classes that contradicts the checkpoint's head.
    assert main(["convert", "--arch", "resnet18", "--from", str(files["resnet18"][0]), "--out", str(out),
                 "--num-classes", "10"]) == 2
    err = one_error_line(capsys)
    assert "2 mis-shaped: fc.weight" in err and "fc.bias (1000,) -> params/fc/bias expects (10,)" in err
    assert not out.exists()
    # A Keras file for a torch-only architecture.
    with pytest.raises(AdvalignError, match="resnet18 has no importer for keras"):
        import_weights({"conv1_conv/kernel": np.zeros((7, 7, 3, 64))}, "keras", "resnet18")
    # A converted resnet18 loaded as another architecture.
    with pytest.raises(AdvalignError, match=r"holds a resnet18 \(1000 classes\), not a resnet50"):
        load_model(resnet18_dir, arch="resnet50")


def test_bfloat16_and_remat(resnet18_dir, resnet18_loaded):
    _, variables, run = resnet18_loaded
    x = random_images(2, 2, SIZE)
    labels = np.array([1, 2])
    logits, _, grad = run(variables, x, labels)

    bf16, _ = load_model(resnet18_dir, dtype="bfloat16")
    assert_close(compile_fast(bf16.apply)(variables, x), logits, tol=5e-2, what="bfloat16 logits")

    remat, _ = load_model(resnet18_dir, remat=True)
    assert_close(ours(remat)(variables, x, labels)[2], grad, tol=1e-5, what="remat input-gradient")
