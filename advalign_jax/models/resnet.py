"""ResNet v1: torchvision/timm ResNet-18/34/50/101 and Keras ``keras.applications.ResNet50``.

One implementation serves both families; they differ only in options of :class:`ResNet`:

=====================  ==========================================  =========================================
                       torchvision / timm (``resnet18..101``)      Keras (``resnet50_keras``)
=====================  ==========================================  =========================================
blocks                 BasicBlock (18, 34), Bottleneck (50, 101)   Bottleneck [3, 4, 6, 3]
stride of a stage      on the 3x3 conv ("v1.5")                    on the first 1x1 conv (``stride_on_1x1``)
conv biases            none (BatchNorm follows every conv)         every conv has a bias (``conv_bias``)
BatchNorm epsilon      1e-5 (momentum 0.1, flax 0.9)               1.001e-5 (momentum 0.99)
input normalisation    ``imagenet``: (x - mean) / std              ``caffe``: BGR, 0..255, means subtracted
=====================  ==========================================  =========================================

Shared structure: 7x7 stride-2 conv (padding 3) + BN + ReLU, 3x3 stride-2 max-pool with padding 1,
four stages of widths 64/128/256/512 (expansion 4 for Bottleneck; stride 2 in the first block of stages
2-4; a 1x1 conv + BN projection shortcut where the shape changes), global average pool, linear head.

Padding: PyTorch pads the 3x3 and 7x7 convs symmetrically by k//2 and the max-pool with -inf. Keras uses
``ZeroPadding2D((3, 3))`` + 'valid' for the stem conv, ``padding="SAME"`` for the stride-1 3x3 convs
(both symmetric k//2, as here), 'valid' 1x1 convs, and ``ZeroPadding2D((1, 1))`` before the max-pool:
zero padding, which gives the same maxima and gradients as -inf here because the pool's input is a
ReLU output (>= 0; a window whose maximum is 0 passes no gradient through the ReLU either way).

Flax parameter tree: ``conv1``, ``bn1``, ``layer{1-4}_{i}/{conv1,bn1,conv2,bn2[,conv3,bn3]
[,downsample_conv,downsample_bn]}``, ``fc``. Intermediates: ``layer{1-4}_out`` (Keras ``conv{2-5}_block*_out``).

Importers:

- ``torch``: torchvision and timm state dicts. Their names are identical for these four depths
  (``conv1``, ``bn1``, ``layer{1-4}.{i}.conv{1,2,3}``, ``.bn{1,2,3}``, ``.downsample.0`` (conv) /
  ``.downsample.1`` (BN), ``fc``; checked against timm 1.0 ``resnet18/34/50/101``); default input
  normalisation ``imagenet``.
- ``robustness`` (the four torchvision depths): checkpoints of the Madry lab's ``robustness`` library
  and microsoft/robust-models-transfer (``checkpoint.pt.best``; the classifier under ``module.model.``
  with the names above, the model's own normaliser, which the import uses;
  :mod:`advalign_jax.models.robustness_format`). ``robustness/imagenet_models/resnet.py`` is
  torchvision's ResNet (stride on the 3x3 conv of the Bottleneck), so the same table applies.
- ``keras`` (``resnet50_keras`` only): Keras layer names ``conv1_conv``, ``conv1_bn``,
  ``conv{2-5}_block{i}_{0,1,2,3}_{conv,bn}`` (``_0_`` is the projection shortcut), ``predictions``.
  keras.applications ResNet50 is the only source of these checkpoints and it was trained on Keras's
  'caffe' preprocessing, so this importer's default normalisation is ``caffe`` (override with
  ``--norm``). The head is imported as logits (the Keras Dense's softmax is not applied).
"""

from __future__ import annotations

import functools
from typing import ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from advalign_jax.models.base import (InputNorm, ModelDef, Normalize, batch_norm, compute_dtype, last_relu,
                                      maybe_remat, stat_dtype, torch_pad)
from advalign_jax.models.importers import (Importer, infer_num_classes, keras_bn, keras_conv, keras_dense,
                                           robustness_importer, torch_bn, torch_conv, torch_dense)

WIDTHS = (64, 128, 256, 512)


def conv(features: int, kernel: int, stride: int, name: str, dtype, bias: bool = False) -> nn.Conv:
    """A square conv with PyTorch's symmetric ``k//2`` padding (equal to Keras's explicit/SAME padding
    wherever these models use it)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=torch_pad(kernel),
                   use_bias=bias, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride on the first) with BN, plus the identity or a 1x1 projection shortcut."""

    expansion: ClassVar[int] = 1
    features: int
    stride: int = 1
    downsample: bool = False
    stride_on_1x1: bool = False  # no 1x1 conv here; accepted so both blocks take the same options
    conv_bias: bool = False
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    dtype: str = "float32"
    fake_relu: bool = False  # the final relu(x + y) as base.fake_relu (identity backward): the last block's

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        bn = functools.partial(batch_norm, train, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=dtype)
        y = nn.relu(bn("bn1")(conv(self.features, 3, self.stride, "conv1", dtype, self.conv_bias)(x)))
        y = bn("bn2")(conv(self.features, 3, 1, "conv2", dtype, self.conv_bias)(y))
        if self.downsample:
            x = bn("downsample_bn")(conv(self.features, 1, self.stride, "downsample_conv", dtype,
                                         self.conv_bias)(x))
        return last_relu(x + y, self.fake_relu)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), each with BN; stride on the 3x3 conv (torchvision "v1.5") or on
    the first 1x1 conv (``stride_on_1x1``: Keras and the original paper)."""

    expansion: ClassVar[int] = 4
    features: int
    stride: int = 1
    downsample: bool = False
    stride_on_1x1: bool = False
    conv_bias: bool = False
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    dtype: str = "float32"
    fake_relu: bool = False  # the final relu(x + y) as base.fake_relu (identity backward): the last block's

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        bn = functools.partial(batch_norm, train, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=dtype)
        s1, s3 = (self.stride, 1) if self.stride_on_1x1 else (1, self.stride)
        y = nn.relu(bn("bn1")(conv(self.features, 1, s1, "conv1", dtype, self.conv_bias)(x)))
        y = nn.relu(bn("bn2")(conv(self.features, 3, s3, "conv2", dtype, self.conv_bias)(y)))
        y = bn("bn3")(conv(self.features * 4, 1, 1, "conv3", dtype, self.conv_bias)(y))
        if self.downsample:
            x = bn("downsample_bn")(conv(self.features * 4, 1, self.stride, "downsample_conv", dtype,
                                         self.conv_bias)(x))
        return last_relu(x + y, self.fake_relu)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet v1; ``block`` is 'basic' or 'bottleneck', ``layers`` the number of blocks per stage."""

    num_classes: int = 1000
    block: str = "bottleneck"
    layers: Sequence[int] = (3, 4, 6, 3)
    norm: InputNorm = InputNorm()
    dtype: str = "float32"
    remat: bool = False
    stride_on_1x1: bool = False
    conv_bias: bool = False
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    fake_relu: bool = False  # the last ReLU (the last block's final one) backward as the identity: base.fake_relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        dtype = compute_dtype(self.dtype)
        x = Normalize(self.norm)(x).astype(dtype)
        x = conv(64, 7, 2, "conv1", dtype, self.conv_bias)(x)
        x = nn.relu(batch_norm(train, "bn1", momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
        block_cls = BLOCKS[self.block]
        block = maybe_remat(block_cls, self.remat)
        channels = 64
        stages = list(zip(WIDTHS, self.layers))
        for s, (width, depth) in enumerate(stages):
            for i in range(depth):
                stride = 2 if (s > 0 and i == 0) else 1
                downsample = i == 0 and (stride != 1 or channels != width * block_cls.expansion)
                last = s == len(stages) - 1 and i == depth - 1  # its relu(x + y) gives the features
                x = block(width, stride, downsample, stride_on_1x1=self.stride_on_1x1, conv_bias=self.conv_bias,
                          bn_eps=self.bn_eps, bn_momentum=self.bn_momentum, dtype=self.dtype,
                          fake_relu=self.fake_relu and last, name=f"layer{s + 1}_{i}")(x, train)
                channels = width * block_cls.expansion
            self.sow("intermediates", f"layer{s + 1}_out", x)
        x = jnp.mean(x.astype(stat_dtype(x)), axis=(1, 2)).astype(dtype)  # float32 (float64 for float64)
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return nn.Dense(self.num_classes, dtype=dtype, name="fc")(x)


# ----------------------------------------------------------------------------------------------------
# Import tables
# ----------------------------------------------------------------------------------------------------

def _blocks(model):
    """(stage index 1-4, block index, has downsample, is bottleneck) for every block of the built model."""
    module = model.module
    expansion = BLOCKS[module.block].expansion
    channels = 64
    for s, (width, depth) in enumerate(zip(WIDTHS, module.layers)):
        for i in range(depth):
            stride = 2 if (s > 0 and i == 0) else 1
            yield s + 1, i, i == 0 and (stride != 1 or channels != width * expansion), module.block == "bottleneck"
            channels = width * expansion


def torch_rules(model) -> list:
    """torchvision/timm state-dict names -> flax variables."""
    rules = torch_conv("conv1", "conv1") + torch_bn("bn1", "bn1")
    for stage, i, downsample, bottleneck in _blocks(model):
        src, dst = f"layer{stage}.{i}", f"layer{stage}_{i}"
        for k in (1, 2, 3) if bottleneck else (1, 2):
            rules += torch_conv(f"{dst}/conv{k}", f"{src}.conv{k}") + torch_bn(f"{dst}/bn{k}", f"{src}.bn{k}")
        if downsample:
            rules += torch_conv(f"{dst}/downsample_conv", f"{src}.downsample.0")
            rules += torch_bn(f"{dst}/downsample_bn", f"{src}.downsample.1")
    return rules + torch_dense("fc", "fc")


def keras_rules(model) -> list:
    """keras.applications ResNet50 layer names -> flax variables (every conv has a bias)."""
    rules = keras_conv("conv1", "conv1_conv") + keras_bn("bn1", "conv1_bn")
    for stage, i, downsample, _ in _blocks(model):
        src, dst = f"conv{stage + 1}_block{i + 1}", f"layer{stage}_{i}"
        for k in (1, 2, 3):
            rules += keras_conv(f"{dst}/conv{k}", f"{src}_{k}_conv") + keras_bn(f"{dst}/bn{k}", f"{src}_{k}_bn")
        if downsample:
            rules += keras_conv(f"{dst}/downsample_conv", f"{src}_0_conv")
            rules += keras_bn(f"{dst}/downsample_bn", f"{src}_0_bn")
    return rules + keras_dense("fc", "predictions")


TORCH = Importer(rules=torch_rules, infer=lambda w: _classes(w, "fc", "torch"), ignore=("num_batches_tracked",),
                 norm="imagenet", description="torchvision / timm ResNet state dicts")
ROBUSTNESS = robustness_importer(TORCH)
KERAS = Importer(rules=keras_rules, infer=lambda w: _classes(w, "predictions", "keras"), norm="caffe",
                 description="keras.applications ResNet50 (.h5 / .keras); its 'caffe' preprocessing")


def _classes(weights, head, family) -> dict:
    n = infer_num_classes(weights, head, family)
    return {} if n is None else {"num_classes": n}


def _torch_def(name: str, block: str, layers: tuple) -> ModelDef:
    return ModelDef(
        name=name, build=ResNet,
        options=dict(num_classes=1000, input_size=224, norm="imagenet", dtype="float32", remat=False,
                     block=block, layers=layers, stride_on_1x1=False, conv_bias=False, bn_eps=1e-5,
                     bn_momentum=0.9),
        description=f"ResNet-{name[6:]} (torchvision / timm; "
                    + ("BasicBlocks)" if block == "basic" else "Bottlenecks, stride on the 3x3 conv: v1.5)"),
        importers={"torch": TORCH, "robustness": ROBUSTNESS})


MODELS = {
    "resnet18": _torch_def("resnet18", "basic", (2, 2, 2, 2)),
    "resnet34": _torch_def("resnet34", "basic", (3, 4, 6, 3)),
    "resnet50": _torch_def("resnet50", "bottleneck", (3, 4, 6, 3)),
    "resnet101": _torch_def("resnet101", "bottleneck", (3, 4, 23, 3)),
    "resnet50_keras": ModelDef(
        name="resnet50_keras", build=ResNet,
        options=dict(num_classes=1000, input_size=224, norm="caffe", dtype="float32", remat=False,
                     block="bottleneck", layers=(3, 4, 6, 3), stride_on_1x1=True, conv_bias=True,
                     bn_eps=1.001e-5, bn_momentum=0.99),
        description="ResNet50 v1 of keras.applications (stride on the 1x1 conv, conv biases, caffe input)",
        importers={"keras": KERAS}),
}
