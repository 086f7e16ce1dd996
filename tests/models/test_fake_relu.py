"""``fake_relu`` / ``with_fake_relu``: the last ReLU before the penultimate features with the identity backward.

The public reference is the Madry lab's ``robustness`` library (MadryLab/robustness,
``robustness/tools/custom_modules.py``)::

    class FakeReLU(torch.autograd.Function):
        forward(ctx, input)        = input.clamp(min=0)
        backward(ctx, grad_output) = grad_output

which its models apply to the last ReLU before the latent features when called with ``fake_relu=True``
(e.g. ``cifar_models/resnet.py``: the last block of ``layer4``). With ``z`` that ReLU's pre-activation,
``features = P relu(z)`` (``P`` linear: the global average pool, or the identity for VGG's torchvision
head) and a direction ``w``:

    plain gradient  d(w . features)/dx = J_z(x)^T (relu'(z) * P^T w)
    fake gradient   d(w . features)/dx = J_z(x)^T (P^T w)           = d(w . P z(x))/dx

What is checked:

- every architecture with the ``fake_relu`` field, tiny configurations, random variables with non-trivial
  BatchNorm statistics: the same variable tree, bitwise the same logits and features, and the fake
  gradient equal to ``d(w . P z(x))/dx`` with ``z(x)`` the pre-activation captured from the *plain* model
  (an analytic identity that does not use our ``fake_relu``); that identity would fail if another ReLU
  than the last one were made fake;
- against PyTorch in float64 (the references in ``tests/references``), with the final ReLU replaced by
  the ``FakeReLU`` above: the robustness library's CIFAR ResNet (BasicBlock and Bottleneck), the
  torchvision-named ResNet-18 layout, TRADES's WideResNet and torchvision's VGG16;
- ``with_fake_relu`` on an architecture whose features do not come out of a ReLU: a ``ConfigError`` that
  names the model;
- the fake-ReLU model under ``jax.jit``, ``jax.vmap`` and rematerialisation.

Every check asserts that some pre-activations of the last ReLU are negative and that the fake gradient
differs from the plain one there, so it can fail.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from advalign_jax.errors import ConfigError
from advalign_jax.models import get_model
from advalign_jax.models.base import fake_relu, with_fake_relu
from advalign_jax.models.convert import import_weights
import torch_resnet
import torch_robustness
import torch_vgg
from model_checks import assert_close, random_images, rel_err
from torch_wideresnet import TorchWideResNet, randomise

# XLA's CPU backend optimisations off: these small programs compile several times faster; the
# computation is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_compiled(fn, *args):
    """``jax.jit(fn)(*args)`` compiled with :data:`FAST_COMPILE`, as numpy arrays."""
    return jax.tree.map(np.asarray, jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args))


def state(variables):
    return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def random_variables(model, seed):
    """Random variables of ``model``'s shapes: kernels ``N(0, 2 / fan_in)``, biases ``N(0, 0.2^2)``,
    BatchNorm scales ``U(0.5, 1.5)``, running means ``N(0, 0.2^2)`` and variances ``U(0.5, 1.5)`` (so the
    last ReLU's pre-activations take both signs)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = str(path[-1].key), leaf.shape
        if name == "kernel":
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0, 0.2, shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            raise AssertionError(f"unexpected variable {jax.tree_util.keystr(path)}")
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, model.variable_shapes())


def pool(z):
    """``P``: the global average pool of a (N, H, W, C) map; the identity on (N, C) (VGG's torchvision head)."""
    return jnp.mean(z, axis=(1, 2)) if z.ndim == 4 else z


def captured(inter, *path):
    """The output of the submodule at ``path``, captured with ``capture_intermediates``."""
    for name in path:
        inter = inter[name]
    return inter["__call__"][0]


def residual_preactivation(block, last_bn, shortcut_bn, previous):
    """``z = last_bn(...) + shortcut`` of a ResNet block: the shortcut is ``shortcut_bn``'s output where the
    block has a projection, else the block's input (the previous block's output)."""
    def pre(inter):
        shortcut = inter[block].get(shortcut_bn)
        shortcut = captured(inter, previous) if shortcut is None else shortcut["__call__"][0]
        return captured(inter, block, last_bn) + shortcut
    return pre


# name: (arch, get_model options, module fields get_model does not take, the last ReLU's pre-activation z
# from the plain model's captured module outputs).
TINY = {
    "small_cnn": ("small_cnn", dict(num_classes=3, input_size=16, widths=(4, 6, 8, 8), patch=2), {},
                  lambda inter: captured(inter, "stage3", "bn")),
    "resnet_basic": ("resnet18", dict(num_classes=3, input_size=32, layers=(2,)), {},
                     residual_preactivation("layer1_1", "bn2", "downsample_bn", "layer1_0")),
    "resnet_bottleneck": ("resnet50", dict(num_classes=3, input_size=32, layers=(2,)), {},
                          residual_preactivation("layer1_1", "bn3", "downsample_bn", "layer1_0")),
    "resnet50_keras": ("resnet50_keras", dict(num_classes=3, input_size=32, layers=(1,)), {},
                       residual_preactivation("layer1_0", "bn3", "downsample_bn", None)),
    "cifar_resnet_basic": ("cifar_resnet18", dict(num_classes=3, input_size=16, stage_sizes=(1, 1),
                                                  widths=(8, 16)), {},
                           residual_preactivation("layer2_0", "bn2", "shortcut_bn", "layer1_0")),
    "cifar_resnet_bottleneck": ("cifar_resnet50", dict(num_classes=3, input_size=16, stage_sizes=(1, 2),
                                                       widths=(4, 8)), {},
                                residual_preactivation("layer2_1", "bn3", "shortcut_bn", "layer2_0")),
    "wideresnet": ("wrn34_10", dict(num_classes=3, input_size=16, depth=10, widen_factor=1), {},
                   lambda inter: captured(inter, "bn1")),
    "resnet_v2": ("resnet50v2", dict(num_classes=3, input_size=32, layers=(1, 1)), {},
                  lambda inter: captured(inter, "post_bn")),
    "vgg_torchvision": ("vgg16_bn", dict(num_classes=3, input_size=32, hidden=16, head="torchvision"),
                        dict(stages=((1, 8), (1, 16))), lambda inter: captured(inter, "fc2")),
    "vgg_timm": ("vgg16", dict(num_classes=3, input_size=32, hidden=16, head="timm"),
                 dict(stages=((1, 8), (1, 16))), lambda inter: captured(inter, "fc2")),
}


def tiny_model(name):
    arch, options, fields, _ = TINY[name]
    model = get_model(arch, **options)
    return dataclasses.replace(model, module=model.module.clone(**fields)) if fields else model


def forward(module):
    """``(variables, x) -> (logits, features)`` in inference mode."""
    def run(variables, x):
        logits, inter = module.apply(variables, x, train=False, mutable=["intermediates"])
        return logits, inter["intermediates"]["features"][0]
    return run


def public_forward(model):
    """``jax.jit((variables, x) -> (model.apply(...), model.intermediates(...)['features']))``, as numpy."""
    run = jax.jit(lambda variables, x: (model.apply(variables, x), model.intermediates(variables, x)["features"]))
    return lambda variables, x: jax.tree.map(np.asarray, run(variables, x))


def features_gradient(module):
    """``(variables, x, w) -> d(sum_n w . features_n)/dx``."""
    def run(variables, x, w):
        return jax.grad(lambda x: jnp.sum(forward(module)(variables, x)[1] @ w))(x)
    return run


def plain_and_identity(module, pre):
    """``(variables, x, w) -> (z, features, plain gradient, d(w . P z(x))/dx)`` from the plain model, with
    ``z(x)`` its last ReLU's pre-activation captured as a module output."""
    def run(variables, x, w):
        def z_and_features(x):
            _, inter = module.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
            return pre(inter["intermediates"]), inter["intermediates"]["features"][0]

        z, features = z_and_features(x)
        plain = jax.grad(lambda x: jnp.sum(z_and_features(x)[1] @ w))(x)
        identity = jax.grad(lambda x: jnp.sum(pool(z_and_features(x)[0]) @ w))(x)
        return z, features, plain, identity
    return run


@pytest.mark.parametrize("name", sorted(TINY))
def test_fake_relu_keeps_the_forward_and_has_the_identity_backward(name):
    """Same variable tree, bitwise the same logits and features (separately compiled programs, the public
    ``Model.apply`` / ``Model.intermediates``), and
    fake gradient = d(w . P z(x))/dx, z(x) the last ReLU's pre-activation of the plain model; the plain
    gradient differs (some z < 0)."""
    model = tiny_model(name)
    fake = with_fake_relu(model)
    assert fake.module.fake_relu and not model.module.fake_relu
    assert (fake.name, fake.num_classes, fake.input_shape, fake.options) == (
        model.name, model.num_classes, model.input_shape, model.options)
    assert fake.variable_shapes() == model.variable_shapes()  # checkpoints unchanged
    variables = state(random_variables(model, seed=len(name)))
    x = random_images(1, 2, model.input_size)

    # Model.apply and Model.intermediates, under jax.jit with XLA's default options (what a user runs).
    logits, features = public_forward(model)(variables, x)
    fake_logits, fake_features = public_forward(fake)(variables, x)
    np.testing.assert_array_equal(fake_logits, logits)
    np.testing.assert_array_equal(fake_features, features)

    w = np.random.default_rng(2).normal(size=features.shape[-1]).astype(np.float32)
    z, _, plain, identity = run_compiled(plain_and_identity(model.module, TINY[name][3]), variables, x, w)
    # z is the pre-activation of the ReLU that gives the features: P relu(z) = features.
    assert_close(pool(np.maximum(z, 0)), features, tol=1e-6, what=f"{name}: P relu(z) against the features")
    assert (z < 0).any() and (z > 0).any(), f"{name}: the last ReLU's pre-activations have one sign"
    fake_grad = run_compiled(features_gradient(fake.module), variables, x, w)
    assert_close(fake_grad, identity, tol=1e-5, what=f"{name}: fake gradient against d(w . P z)/dx")
    assert rel_err(fake_grad, plain) > 1e-2, f"{name}: the fake gradient equals the plain one"


# ----------------------------------------------------------------------------------------------------
# Against PyTorch, float64
# ----------------------------------------------------------------------------------------------------

class FakeReLU(torch.autograd.Function):
    """MadryLab/robustness ``robustness/tools/custom_modules.py``: ``clamp(min=0)`` forward, the incoming
    gradient passed through unchanged backward."""

    @staticmethod
    def forward(ctx, input):
        return input.clamp(min=0)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def torch_last_block(block, x):
    """(pre-activation z, shortcut-summed) of a reference ResNet block's final ReLU: ``z = bn2(conv2(relu(
    bn1(conv1(x))))) + shortcut(x)`` (BasicBlock) or the Bottleneck's ``bn3(conv3(...)) + shortcut(x)``,
    the shortcut being ``shortcut`` (robustness / kuangliu names) or ``downsample`` (torchvision's)."""
    h = torch.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        h = block.bn3(block.conv3(torch.relu(block.bn2(block.conv2(h)))))
    else:
        h = block.bn2(block.conv2(h))
    if hasattr(block, "shortcut"):
        shortcut = block.shortcut(x)
    else:
        shortcut = x if block.downsample is None else block.downsample(x)
    return h + shortcut


def torch_stages(net, x, names):
    """Runs the stages ``names`` of ``net`` but the last block of the last one; returns that block and its
    input."""
    for name in names[:-1]:
        x = getattr(net, name)(x)
    *blocks, last = getattr(net, names[-1])
    for block in blocks:
        x = block(x)
    return last, x


def robustness_cifar_z(net, x):
    """The robustness library's CIFAR ResNet up to the last ReLU (``cifar_models/resnet.py``, which passes
    ``fake_relu`` to the last block of ``layer4``); its latent is ``avg_pool2d(out, 4)`` flattened."""
    last, h = torch_stages(net, torch.relu(net.bn1(net.conv1(x))), ["layer1", "layer2", "layer3", "layer4"])
    return torch_last_block(last, h), lambda a: torch.nn.functional.avg_pool2d(a, 4).flatten(1)


def torchvision_resnet_z(net, x):
    """torchvision's ResNet (tests/references/torch_resnet.py) up to the last block's final ReLU; the
    features are the adaptive average pool, flattened."""
    last, h = torch_stages(net, net.maxpool(torch.relu(net.bn1(net.conv1(x)))),
                           ["layer1", "layer2", "layer3", "layer4"])
    return torch_last_block(last, h), lambda a: torch.flatten(torch.nn.functional.adaptive_avg_pool2d(a, 1), 1)


def trades_wrn_z(net, x):
    """TRADES's WideResNet: ``z = bn1(block3(...))``, features ``avg_pool2d(relu(z), 8)`` flattened."""
    return net.bn1(net.stages(x)["block3_out"]), lambda a: torch.nn.functional.avg_pool2d(a, 8).flatten(1)


def torchvision_vgg_z(net, x):
    """torchvision's VGG16: ``z = classifier.3(dropout(relu(classifier.0(flatten(avgpool(features(x)))))))``;
    the features are ``relu(z)`` (dropout is the identity in eval mode)."""
    h = net.classifier[2](net.classifier[1](net.classifier[0](torch.flatten(net.avgpool(net.features(x)), 1))))
    return net.classifier[3](h), net.classifier[5]


def torch_gradients(net, pre, x_nhwc, w):
    """(z, features, plain gradient, FakeReLU gradient) of ``sum_n w . features_n`` for the reference
    (float64, NHWC gradients)."""
    x = torch.tensor(np.transpose(x_nhwc, (0, 3, 1, 2)), requires_grad=True)
    out = {}
    for kind, relu in (("plain", torch.relu), ("fake", FakeReLU.apply)):
        z, head = pre(net, x)
        features = head(relu(z))
        (grad,) = torch.autograd.grad((features @ torch.tensor(w)).sum(), x)
        out[kind] = np.transpose(grad.numpy(), (0, 2, 3, 1))
    return z.detach().numpy(), features.detach().numpy(), out["plain"], out["fake"]


def _robustness_cifar(block):
    def build():
        torch.manual_seed(0)
        net = torch_robustness.CifarResNet(getattr(torch_robustness, block), (1, 1, 1, 1), num_classes=5,
                                           wm=1 / 16)
        return _randomise(net)
    return build


def _randomise(net, seed=1):
    return randomise(net, seed=seed).eval()


def _torchvision_resnet18():
    torch.manual_seed(0)
    return _randomise(torch_resnet.ResNet(torch_resnet.BasicBlock, (1, 1, 1, 1), num_classes=5))


def _trades_wrn():
    torch.manual_seed(0)
    return _randomise(TorchWideResNet(depth=10, widen_factor=1, num_classes=5))


def _torchvision_vgg16():
    return torch_vgg.randomize(torch_vgg.VGG(num_classes=5, hidden=16), seed=3)


# name: (build the reference, its pre-activation function, our arch, import overrides)
TORCH = {
    "robustness_cifar_basic": (_robustness_cifar("BasicBlock"), robustness_cifar_z, "cifar_resnet18", {}),
    "robustness_cifar_bottleneck": (_robustness_cifar("Bottleneck"), robustness_cifar_z, "cifar_resnet50", {}),
    "torchvision_resnet18": (_torchvision_resnet18, torchvision_resnet_z, "resnet18",
                             dict(layers=(1, 1, 1, 1), input_size=32)),
    "trades_wrn": (_trades_wrn, trades_wrn_z, "wrn34_10", {}),
    "torchvision_vgg16": (_torchvision_vgg16, torchvision_vgg_z, "vgg16", dict(input_size=32)),
}


@pytest.mark.parametrize("name", sorted(TORCH))
def test_fake_relu_gradient_matches_robustness_fake_relu_in_torch(name):
    """float64: our ``with_fake_relu`` model's features and d(w . features)/dx equal those of the PyTorch
    reference with its last ReLU replaced by the robustness library's ``FakeReLU`` (1e-10 and 1e-8 of the
    reference's scale); the reference's plain and FakeReLU gradients differ (some z < 0)."""
    build, pre, arch, overrides = TORCH[name]
    net = build()
    weights = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    net = net.double()
    x = random_images(3, 2, 32).astype(np.float64)
    with torch.no_grad():
        z0, head = pre(net, torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    w = np.random.default_rng(4).normal(size=head(z0).shape[-1])
    z, ref_features, ref_plain, ref_fake = torch_gradients(net, pre, x, w)
    assert (z < 0).any() and (z > 0).any(), f"{name}: the last ReLU's pre-activations have one sign"
    assert rel_err(ref_fake, ref_plain) > 1e-2, f"{name}: FakeReLU changes nothing here"

    with jax.enable_x64(True):
        model, variables = import_weights(weights, "torch", arch, norm="none", dtype="float64", **overrides)
        variables = jax.tree.map(lambda a: np.asarray(a, np.float64), state(variables))
        fake = with_fake_relu(model)
        _, features = run_compiled(forward(fake.module), variables, x)
        grad = run_compiled(features_gradient(fake.module), variables, x, w)
    assert grad.dtype == np.float64
    assert_close(features, ref_features, tol=1e-10, what=f"{name}: features, float64")
    assert_close(grad, ref_fake, tol=1e-8, what=f"{name}: fake-ReLU input-gradient against torch FakeReLU, float64")


def test_fake_relu_primitive_is_robustness_fake_relu():
    """``fake_relu(z) = max(z, 0)`` bitwise (as ``nn.relu`` and torch's ``FakeReLU.forward``), and its VJP
    returns the cotangent unchanged (``FakeReLU.backward``), zeros of z included."""
    z = np.array([-2.0, -0.5, 0.0, 0.25, 3.0], np.float32)
    g = np.array([1.0, -2.0, 3.0, -4.0, 5.0], np.float32)
    out, vjp = jax.vjp(fake_relu, jnp.asarray(z))
    np.testing.assert_array_equal(out, jax.nn.relu(z))
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], g)
    t = torch.tensor(z, requires_grad=True)
    ref = FakeReLU.apply(t)
    (ref_grad,) = torch.autograd.grad(ref, t, torch.tensor(g))
    np.testing.assert_array_equal(out, ref.detach().numpy())
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], ref_grad.numpy())


# ----------------------------------------------------------------------------------------------------
# Architectures without a final ReLU; transformations
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["convnext_tiny", "vit_ti16", "cifar_vit", "efficientnet_b0"])
def test_with_fake_relu_on_an_architecture_without_a_final_relu_names_it(arch):
    """ConvNeXt and the ViTs end in a LayerNorm, EfficientNet in a SiLU: with_fake_relu raises ConfigError
    naming the model."""
    model = get_model(arch)
    assert "fake_relu" not in {f.name for f in dataclasses.fields(model.module)}
    with pytest.raises(ConfigError, match=re.escape(f"model {arch} ")):
        with_fake_relu(model)


def test_fake_relu_model_composes_with_jit_vmap_and_remat():
    """The fake gradient of w . features is the same (to float32 rounding) computed as jit(grad(f)),
    grad(jit(f)) (the custom VJP differentiated through a compiled call), jit(vmap(one-example gradient))
    (inference mode: examples are independent, so it equals the batch gradient), and with the
    rematerialised model (``remat=True``: every block in ``jax.checkpoint``, ``train`` static)."""
    name = "resnet_basic"
    model = tiny_model(name)
    variables = state(random_variables(model, seed=5))
    x = random_images(6, 3, model.input_size)
    w = np.random.default_rng(7).normal(size=64).astype(np.float32)
    fake = with_fake_relu(model)
    grad = features_gradient(fake.module)
    batch = np.asarray(jax.jit(grad)(variables, x, w))
    features = jax.jit(lambda x: forward(fake.module)(variables, x)[1])
    close = dict(rtol=1e-5, atol=1e-6 * np.max(np.abs(batch)))
    np.testing.assert_allclose(np.asarray(jax.grad(lambda x: jnp.sum(features(x) @ w))(x)), batch, **close)
    one = lambda xi: grad(variables, xi[None], w)[0]  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(one))(x)), batch, **close)
    remat = with_fake_relu(get_model(TINY[name][0], **{**TINY[name][1], "remat": True}))
    assert remat.module.remat and remat.module.fake_relu
    np.testing.assert_allclose(np.asarray(jax.jit(features_gradient(remat.module))(variables, x, w)), batch,
                               **close)
    # The plain model's gradient is another one (the test can fail).
    plain = np.asarray(jax.jit(features_gradient(model.module))(variables, x, w))
    assert rel_err(batch, plain) > 1e-2
