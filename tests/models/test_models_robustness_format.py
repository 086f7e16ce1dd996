"""Checkpoints of the Madry lab's ``robustness`` library (``checkpoint.pt.best``) through ``advalign-jax convert``.

The files are written by tests/references/torch_robustness.py in exactly that library's layout: the
classifier wrapped in ``AttackerModel`` (normaliser, classifier, attacker holding the classifier again)
in ``DataParallel``, saved with optimizer, schedule and epoch. Classifiers: the torchvision-layout
ResNet-50 of tests/references/torch_resnet.py (the ImageNet robust models), and the library's CIFAR
ResNet-18 (BasicBlocks) and ResNet-50 (Bottlenecks) at a quarter of the width (its ``wm`` option). Each
normaliser differs from the architecture's default, so a model that ignored it would fail.

Compared with the torch model wrapped in its normaliser, on the same [0, 1] input: logits in float32
(1e-4 of the reference's scale; the CIFAR ResNet-18), logits and the input-gradient of the true-class logit in
float64 (1e-10 and 1e-8; float32 rounding near ReLU and max-pool kinks is not compared). Bad input: one
line each, nothing written.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torch_resnet
import torch_robustness
from advalign_jax.cli.main import main
from advalign_jax.models import get_model, importers, load_model
from advalign_jax.models.base import InputNorm
from advalign_jax.models.convert import import_weights
from model_checks import assert_close, random_images, rel_err, torch_true_class_grad

# XLA's CPU backend optimisations off: the ResNet-50 programs compile in a fraction of the time; the
# computation is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

IMAGENET_LIKE = ((0.4717, 0.4499, 0.3837), (0.2600, 0.2516, 0.2575))  # not the imagenet default
CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
OTHER = ((0.5, 0.4, 0.3), (0.25, 0.3, 0.2))  # neither 'half' nor 'cifar10'


def logits_and_grad(model, variables, x, labels=None):
    """Inference-mode logits and, given ``labels``, d(sum of true-class logits)/dx; compiled without
    backend optimisation."""
    def f(variables, x):
        if labels is None:
            return model.module.apply(variables, x, train=False), None

        def picked(x):
            logits = model.module.apply(variables, x, train=False)
            return jnp.sum(jnp.take_along_axis(logits, jnp.asarray(labels)[:, None], axis=1)), logits

        (_, logits), grad = jax.value_and_grad(picked, has_aux=True)(x)
        return logits, grad

    state = {k: variables[k] for k in ("params", "batch_stats")}
    compiled = jax.jit(f).lower(state, x).compile(compiler_options=FAST_COMPILE)
    return jax.tree.map(np.asarray, compiled(state, x))


def check_against_torch(wrapped, model_dir, size, labels, seed, float32=True):
    """Converted model vs ``wrapped`` (DataParallel(AttackerModel)) in eval mode: float32 logits (unless
    ``float32=False``), float64 logits and input-gradient."""
    x = random_images(seed, len(labels), size)
    model, variables = load_model(model_dir)
    if float32:
        logits, _ = logits_and_grad(model, variables, x)
        with torch.no_grad():
            ref_logits = wrapped(torch.tensor(np.transpose(x, (0, 3, 1, 2)))).numpy()
        assert_close(logits, ref_logits, what=f"{model.name} logits")
    double = copy.deepcopy(wrapped.module).double()
    ref_grad, ref_logits64 = torch_true_class_grad(double, x.astype(np.float64), labels)
    with jax.enable_x64(True):
        model64 = get_model(model.name, **{**model.options, "dtype": "float64"})
        variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        logits64, grad64 = logits_and_grad(model64, variables64, x.astype(np.float64), labels)
    assert grad64.dtype == np.float64
    assert_close(logits64, ref_logits64, tol=1e-10, what=f"{model.name} logits, float64")
    assert_close(grad64, ref_grad, tol=1e-8, what=f"{model.name} input-gradient, float64")
    f32 = f"logits {rel_err(logits, ref_logits):.1e}, " if float32 else ""
    print(f"{model.name}: {f32}logits (float64) {rel_err(logits64, ref_logits64):.1e}, input-gradient (float64) "
          f"{rel_err(grad64, ref_grad):.1e}")
    return model


def convert(capsys, arch, source, out):
    assert main(["convert", "--arch", arch, "--from", str(source), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"wrote {out}"), lines
    return lines[0]


def test_imagenet_resnet50(tmp_path, capsys):
    net = torch_resnet.resnet("resnet50", num_classes=1000, seed=0)
    path = tmp_path / "checkpoint.pt.best"
    wrapped = torch_robustness.save_checkpoint(path, net, *IMAGENET_LIKE, epoch=89, prec1=torch.tensor(35.16))
    found = convert(capsys, "resnet50", path, tmp_path / "ours")
    assert found == (f"{path}: robustness-library checkpoint (epoch 89): 320 tensors for resnet50, normaliser "
                     "mean (0.4717, 0.4499, 0.3837) std (0.26, 0.2516, 0.2575); the duplicate attacker copy ignored")
    # float64 only: the float32 ResNet is compared with torch (resnet18) and Keras (ResNet-50's Bottlenecks)
    # in test_models_resnet.py; 17 px (9-5-3-2-1 feature maps) keeps the ResNet-50's run short.
    model = check_against_torch(wrapped, str(tmp_path / "ours"), 17, np.array([7, 917]), seed=0, float32=False)
    mean, std = (tuple(float(v) for v in np.float32(values)) for values in IMAGENET_LIKE)
    assert model.module.norm == InputNorm(mean, std) and model.num_classes == 1000


@pytest.mark.parametrize("arch,name", [("cifar_resnet18", "resnet18"), ("cifar_resnet50", "resnet50")])
def test_cifar_resnets(tmp_path, capsys, arch, name):
    net = torch_robustness.cifar_resnet(name, num_classes=10, wm=0.25, seed=1)
    path = tmp_path / "checkpoint.pt.latest"
    wrapped = torch_robustness.save_checkpoint(path, net, *OTHER, epoch=150)
    found = convert(capsys, arch, path, tmp_path / "ours")
    assert "robustness-library checkpoint (epoch 150)" in found and f"for {arch}" in found
    # float32 logits on the BasicBlock model; the Bottleneck model (16 blocks, the same layers) in float64 only.
    model = check_against_torch(wrapped, str(tmp_path / "ours"), 32, np.array([3, 9]), seed=1,
                                float32=arch == "cifar_resnet18")
    assert model.options["widths"] == (16, 32, 64, 128)
    assert model.module.norm.mean == tuple(float(v) for v in np.float32(OTHER[0]))


def test_the_reader_keeps_the_classifier_and_the_normaliser(tmp_path):
    net = torch_robustness.cifar_resnet("resnet18", wm=0.125, seed=2)
    path = tmp_path / "ckpt.pt"
    torch_robustness.save_checkpoint(path, net, *CIFAR, prec1=np.float64(53.5))  # a NumPy scalar beside the weights
    family, weights = importers.read_checkpoint(str(path))
    state = net.state_dict()
    assert family == "robustness"
    assert set(weights) == set(state) | {"normalizer.new_mean", "normalizer.new_std"}
    np.testing.assert_array_equal(weights["layer2.0.shortcut.0.weight"], state["layer2.0.shortcut.0.weight"].numpy())
    np.testing.assert_array_equal(weights["normalizer.new_std"], np.float32(CIFAR[1]))
    # The same weights as the plain state dict, and the checkpoint's normaliser instead of the default.
    robust_model, robust = import_weights(weights, family, "cifar_resnet18")
    plain_model, plain = import_weights({k: v.numpy() for k, v in state.items()}, "torch", "cifar_resnet18")
    for a, b in zip(jax.tree.leaves(robust), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    assert plain_model.module.norm.mean == (0.5, 0.5, 0.5)
    assert robust_model.module.norm.std == tuple(float(v) for v in np.float32(CIFAR[1]))
    # The same state dict saved as .safetensors (DataParallel names, copies unshared) reads the same way.
    sd = torch.nn.DataParallel(torch_robustness.AttackerModel(net, *CIFAR)).state_dict()
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(tmp_path / "ckpt.safetensors"))
    family2, weights2 = importers.read_checkpoint(str(tmp_path / "ckpt.safetensors"))
    assert family2 == "robustness" and set(weights2) == set(weights)


@pytest.fixture(scope="module")
def small_state():
    """The AttackerModel state dict (as saved: DataParallel names) of a small CIFAR ResNet-18."""
    net = torch_robustness.cifar_resnet("resnet18", wm=0.125, seed=3)
    return torch.nn.DataParallel(torch_robustness.AttackerModel(net, *CIFAR)).state_dict()


def one_line_error(capsys, arch, path, out):
    code = main(["convert", "--arch", arch, "--from", str(path), "--out", str(out)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and err.count("\n") == 0 and not captured.out, (code, captured)
    assert not out.exists()
    return err


def test_bad_robustness_checkpoints(small_state, tmp_path, capsys):
    out = tmp_path / "out"
    # An architecture without this importer: the file and the architectures that have one are named.
    torch.save({"model": small_state, "epoch": 3}, tmp_path / "good.pt")
    err = one_line_error(capsys, "cifar_vit", tmp_path / "good.pt", out)
    assert str(tmp_path / "good.pt") in err and "cifar_vit has no importer for robustness-library checkpoints" in err
    assert "cifar_resnet18, cifar_resnet50, resnet101, resnet18, resnet34, resnet50" in err
    # The classifier and the attacker's copy differ in names.
    damaged = {k: v for k, v in small_state.items() if k != "module.attacker.model.linear.bias"}
    torch.save({"model": damaged, "epoch": 3}, tmp_path / "damaged.pt")
    err = one_line_error(capsys, "cifar_resnet18", tmp_path / "damaged.pt", out)
    assert "classifier and attacker copies differ in names" in err and "1 only in module.model: linear.bias" in err
    # No normaliser ('state_dict', the legacy key).
    bare = {k: v for k, v in small_state.items() if "normalize" not in k}
    torch.save({"state_dict": bare, "epoch": 3}, tmp_path / "bare.pt")
    err = one_line_error(capsys, "cifar_resnet18", tmp_path / "bare.pt", out)
    assert "without its normaliser (no module.normalizer.new_mean or module.normalizer.new_std)" in err
    # A CIFAR checkpoint as the ImageNet ResNet-50: every mismatch listed.
    err = one_line_error(capsys, "resnet50", tmp_path / "good.pt", out)
    assert "(as resnet50) does not fit" in err and "missing: layer1.0.conv3.weight" in err
