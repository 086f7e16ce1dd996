"""The CIFAR ResNets: PAG's ResNet-18 and the robustness library's CIFAR ResNet-18/50.

``cifar_resnet18`` matches ``models/resnet.py`` of the official PAG code (Ganz, Kawar, Elad, "Do
Perceptually Aligned Gradients Imply Robustness?", ICML 2023; royg27/PAG-ROB), itself the widely used
kuangliu/pytorch-cifar ResNet, which is also ``robustness/cifar_models/resnet.py`` of the Madry lab's
``robustness`` library (same layout and names):

- stem: 3x3 conv, stride 1, padding 1, no bias -> BatchNorm -> ReLU; no max-pool;
- four stages of blocks, widths 64/128/256/512, stride 2 in the first block of stages 2-4;
  ``block="basic"`` (ResNet-18/34): ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3
  convs (stride on ``conv1``); ``block="bottleneck"`` (ResNet-50/101/152, expansion 4):
  ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))`` with 1x1, 3x3 (stride here)
  and 1x1 convs; the shortcut is a 1x1 conv (stride s, no bias) + BatchNorm where the shape changes
  (identity otherwise); convs pad symmetrically by ``k // 2`` as PyTorch does;
- global average pooling (``AdaptiveAvgPool2d(1)`` in PAG, ``avg_pool2d(out, 4)`` in the robustness
  library: the same at 32 px) and a linear head.

Input normalisation: ``"half"`` (mean 0.5, std 0.5) for ``cifar_resnet18`` (PAG trains on images in
[-1, 1] and attacks in [0, 1] with that normalisation in front of the model); ``"cifar10"`` for
``cifar_resnet50``; a robustness-library checkpoint brings its own.

BatchNorm (:class:`TorchBatchNorm`) is PyTorch's: epsilon 1e-5, the batch normalised with the biased
batch variance, and the running variance updated with the **unbiased** one (flax's ``nn.BatchNorm`` uses
the biased variance for both, which drifts from PyTorch's running statistics during training). Momentum
follows flax's convention: ``momentum=0.9`` here is PyTorch's ``momentum=0.1``.

Parameters are initialised as PyTorch initialises them (``kaiming_uniform(a=sqrt(5))`` weights, uniform
``+-1/sqrt(fan_in)`` linear biases, BatchNorm scale 1 and bias 0), so training from scratch starts
where the official code starts.

Weight import:

- ``"torch"``: the official state-dict names, e.g. ``conv1.weight``, ``bn1.running_mean``,
  ``layer2.0.conv1.weight`` (``conv3`` too in Bottlenecks), ``layer2.0.shortcut.0.weight`` (conv),
  ``layer2.0.shortcut.1.weight`` (BN), ``linear.weight``; the blocks per stage and the widths are read
  off the checkpoint (so ResNet-34, the robustness library's ``resnet18wide`` or ``wm`` width multiplier,
  and ResNet-101/152 import too). Checkpoints saved from ``DataParallel`` (``module.`` prefix) are read
  through :mod:`advalign_jax.models.readers`, which drops the prefix.
- ``"robustness"``: the robustness library's ``checkpoint.pt.best`` files (the classifier under
  ``module.model.``, the model's own normaliser; :mod:`advalign_jax.models.robustness_format`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.models import importers
from advalign_jax.models.base import (InputNorm, ModelDef, Normalize, compute_dtype, last_relu, maybe_remat,
                                      stat_dtype, torch_pad)

# PyTorch's default initialisation of Conv2d/Linear weights: kaiming_uniform(a=sqrt(5)), i.e.
# uniform(+-1/sqrt(fan_in)) = variance_scaling(1/3, fan_in, uniform).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's default bias initialisation of Linear/Conv2d: uniform(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_dense(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
    """``nn.Dense`` initialised like ``torch.nn.Linear(fan_in, features)``."""
    return nn.Dense(features, dtype=dtype, kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in),
                    name=name)


class TorchBatchNorm(nn.Module):
    """PyTorch ``BatchNorm2d`` semantics over the last axis (NHWC).

    Inference: ``(x - running_mean) / sqrt(running_var + eps) * scale + bias``. Training: the batch is
    normalised with its mean and biased variance over all axes but the last; the running statistics
    become ``momentum * old + (1 - momentum) * batch`` with the **unbiased** batch variance
    (``n / (n - 1)``), as PyTorch does. ``momentum`` is flax's (0.9 = PyTorch's 0.1).
    Statistics are computed in float32 whatever the compute dtype (float64 for a float64 model). ``axis_name`` averages the batch
    statistics across a mapped axis (``pmap``/``shard_map``); under ``jit`` with sharded arrays the
    batch axis is already global. Variables are named like flax's BatchNorm (params ``scale``/``bias``,
    batch_stats ``mean``/``var``).
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: object = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        xf = x.astype(stat_dtype(x))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            count = int(np.prod([x.shape[a] for a in axes]))
            mean = jnp.mean(xf, axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)
        y = (xf - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
    """A bias-free PyTorch-style conv: symmetric padding ``kernel // 2``."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=torch_pad(kernel),
                   use_bias=False, dtype=dtype, kernel_init=torch_kernel_init, name=name)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a 1x1 conv + BN when the
    stride or width changes (``shortcut.0`` / ``shortcut.1`` in the official names)."""

    expansion: ClassVar[int] = 1
    features: int
    stride: int = 1
    dtype: str = "float32"
    bn_axis_name: Optional[str] = None
    fake_relu: bool = False  # the final relu(out + x) as base.fake_relu (identity backward): the last block's

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        bn = functools.partial(TorchBatchNorm, use_running_average=not train, dtype=dtype,
                               axis_name=self.bn_axis_name)
        out = nn.relu(bn(name="bn1")(_conv(self.features, 3, self.stride, dtype, "conv1")(x)))
        out = bn(name="bn2")(_conv(self.features, 3, 1, dtype, "conv2")(out))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = bn(name="shortcut_bn")(_conv(self.features, 1, self.stride, dtype, "shortcut_conv")(x))
        return last_relu(out + x, self.fake_relu)


class Bottleneck(nn.Module):
    """``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``: 1x1 conv to ``features``,
    3x3 conv with the stride, 1x1 conv to ``4 * features``; the shortcut (1x1 conv + BN, stride s) where
    the stride or width changes (``shortcut.0`` / ``shortcut.1``)."""

    expansion: ClassVar[int] = 4
    features: int
    stride: int = 1
    dtype: str = "float32"
    bn_axis_name: Optional[str] = None
    fake_relu: bool = False  # the final relu(out + x) as base.fake_relu (identity backward): the last block's

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        bn = functools.partial(TorchBatchNorm, use_running_average=not train, dtype=dtype,
                               axis_name=self.bn_axis_name)
        out = nn.relu(bn(name="bn1")(_conv(self.features, 1, 1, dtype, "conv1")(x)))
        out = nn.relu(bn(name="bn2")(_conv(self.features, 3, self.stride, dtype, "conv2")(out)))
        out = bn(name="bn3")(_conv(4 * self.features, 1, 1, dtype, "conv3")(out))
        if self.stride != 1 or x.shape[-1] != 4 * self.features:
            x = bn(name="shortcut_bn")(_conv(4 * self.features, 1, self.stride, dtype, "shortcut_conv")(x))
        return last_relu(out + x, self.fake_relu)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class CifarResNet(nn.Module):
    """The CIFAR ResNet (3x3 stride-1 stem, no max-pool); ``block`` is 'basic' or 'bottleneck'.
    Defaults: ResNet-18."""

    num_classes: int = 10
    block: str = "basic"
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    norm: InputNorm = InputNorm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    dtype: str = "float32"
    remat: bool = False
    bn_axis_name: Optional[str] = None
    fake_relu: bool = False  # the last ReLU (the last block's final one) backward as the identity: base.fake_relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.block not in BLOCKS:
            raise ValueError(f"CIFAR ResNet block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        dtype = compute_dtype(self.dtype)
        x = Normalize(self.norm)(x).astype(dtype)
        x = _conv(self.widths[0], 3, 1, dtype, "conv1")(x)
        x = TorchBatchNorm(use_running_average=not train, dtype=dtype, axis_name=self.bn_axis_name,
                           name="bn1")(x)
        x = nn.relu(x)
        self.sow("intermediates", "stem_out", x)
        block = maybe_remat(BLOCKS[self.block], self.remat)
        stages = list(zip(self.stage_sizes, self.widths))
        for i, (size, width) in enumerate(stages):
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                last = i == len(stages) - 1 and j == size - 1  # its relu(out + x) gives the features
                x = block(width, stride, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                          fake_relu=self.fake_relu and last, name=f"layer{i + 1}_{j}")(x, train)
            self.sow("intermediates", f"layer{i + 1}_out", x)
        x = jnp.mean(x.astype(stat_dtype(x)), axis=(1, 2)).astype(dtype)
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return torch_dense(self.num_classes, x.shape[-1], dtype, "linear")(x)


# ----------------------------------------------------------------------------------------------------
# Import of the official (kuangliu-style) PyTorch state dict
# ----------------------------------------------------------------------------------------------------

def torch_rules(model) -> list:
    """Mapping table: official (kuangliu / PAG / robustness-library) CIFAR ResNet state-dict names -> our
    variables."""
    module = model.module
    expansion = BLOCKS[module.block].expansion
    convs = (1, 2, 3) if module.block == "bottleneck" else (1, 2)
    rules = importers.torch_conv("conv1", "conv1") + importers.torch_bn("bn1", "bn1")
    in_width = module.widths[0]
    for i, (size, width) in enumerate(zip(module.stage_sizes, module.widths)):
        for j in range(size):
            ours, theirs = f"layer{i + 1}_{j}", f"layer{i + 1}.{j}"
            for k in convs:
                rules += importers.torch_conv(f"{ours}/conv{k}", f"{theirs}.conv{k}")
                rules += importers.torch_bn(f"{ours}/bn{k}", f"{theirs}.bn{k}")
            stride = 2 if i > 0 and j == 0 else 1
            if stride != 1 or in_width != expansion * width:
                rules += importers.torch_conv(f"{ours}/shortcut_conv", f"{theirs}.shortcut.0")
                rules += importers.torch_bn(f"{ours}/shortcut_bn", f"{theirs}.shortcut.1")
            in_width = expansion * width
    rules += importers.torch_dense("linear", "linear")
    return rules


def torch_infer(weights) -> dict:
    """num_classes from ``linear``; stage sizes and widths from the ``layerS.B.conv1`` tensors (when the
    checkpoint has all four stages)."""
    options = {}
    num_classes = importers.infer_num_classes(weights, "linear", "torch")
    if num_classes is not None:
        options["num_classes"] = num_classes
    sizes, widths = [], []
    for stage in range(1, 5):
        blocks = 0
        while f"layer{stage}.{blocks}.conv1.weight" in weights:
            blocks += 1
        if blocks == 0:
            return options
        sizes.append(blocks)
        widths.append(int(np.shape(weights[f"layer{stage}.0.conv1.weight"])[0]))
    options["stage_sizes"], options["widths"] = tuple(sizes), tuple(widths)
    return options


TORCH = importers.Importer(rules=torch_rules, infer=torch_infer, ignore=("num_batches_tracked",), norm="half",
                           description="official PAG / kuangliu pytorch-cifar ResNet state dict")
TORCH50 = dataclasses.replace(TORCH, norm="cifar10",
                              description="kuangliu pytorch-cifar / robustness-library CIFAR ResNet-50 state dict")


def _def(name: str, block: str, stage_sizes: tuple, norm: str, description: str, torch: importers.Importer):
    return ModelDef(
        name=name, build=CifarResNet,
        options=dict(num_classes=10, input_size=32, norm=norm, block=block, stage_sizes=stage_sizes,
                     widths=(64, 128, 256, 512), dtype="float32", remat=False, bn_axis_name=None),
        description=description,
        importers={"torch": torch, "robustness": importers.robustness_importer(torch)})


MODELS = {
    "cifar_resnet18": _def("cifar_resnet18", "basic", (2, 2, 2, 2), "half",
                           "CIFAR ResNet-18 of PAG and the robustness library (3x3 stride-1 stem, no max-pool, "
                           "BasicBlocks [2,2,2,2])", TORCH),
    "cifar_resnet50": _def("cifar_resnet50", "bottleneck", (3, 4, 6, 3), "cifar10",
                           "CIFAR ResNet-50 of the robustness library / kuangliu (3x3 stride-1 stem, no max-pool, "
                           "Bottlenecks [3,4,6,3])", TORCH50),
}
