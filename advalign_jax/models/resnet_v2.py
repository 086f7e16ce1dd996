"""ResNet v2 (pre-activation): Keras ``keras.applications.ResNet50V2``, the harmonized ResNet50V2 release.

Matches ``keras.src.applications.resnet.residual_block_v2`` / ``stack_residual_blocks_v2`` and
``ResNet(preact=True, use_bias=True)``:

- Stem: ``conv1_pad`` ZeroPadding2D(3) + ``conv1_conv`` 7x7 stride 2 **with bias, no BN/ReLU**, then
  ``pool1_pad`` ZeroPadding2D(1) + ``pool1_pool`` 3x3 stride-2 'valid' max-pool. The pool's input can be
  negative here, so it is padded with **zeros** (not -inf as in PyTorch).
- Block ``conv{s}_block{i}``: ``preact_bn`` + ReLU on the input; shortcut = ``_0_conv`` (1x1, bias) of the
  pre-activation in the first block of a stage, else the raw input, subsampled by ``MaxPooling2D(1,
  strides=2)`` (i.e. ``x[:, ::2, ::2]``) when the block has stride 2; main path ``_1_conv`` 1x1 (no bias)
  + ``_1_bn`` + ReLU, ``_2_pad`` ZeroPadding2D(1) + ``_2_conv`` 3x3 (no bias, the block's stride) +
  ``_2_bn`` + ReLU, ``_3_conv`` 1x1 x4 (bias); output = shortcut + main (``_out``, no activation).
- The stride sits in the **last** block of stages conv2, conv3, conv4 (conv5 has stride 1), on the 3x3
  conv and the max-pool shortcut.
- ``post_bn`` + ReLU, global average pool, ``predictions`` Dense (imported as logits; the Keras layer's
  softmax, if any, is not applied).
- BatchNorm epsilon 1.001e-5, Keras momentum 0.99.

Flax parameter tree: ``conv1``, ``conv{2-5}_block{i}/{preact_bn,conv0,conv1,bn1,conv2,bn2,conv3}``,
``post_bn``, ``predictions``. Intermediates: ``conv{2-5}_out`` (Keras ``conv{2-5}_block{last}_out``).

Importer ``keras``: the layer names above (``conv1_conv``, ``conv2_block1_preact_bn``,
``conv2_block1_0_conv``, ``conv2_block1_1_conv``, ``conv2_block1_1_bn``, ..., ``post_bn``,
``predictions``). Its default normalisation is ``imagenet``, ``(x/255 - mean) / std``: the convention of
the harmonized ResNet50V2 release (Fel, Felipe, Linsley, Serre, "Harmonizing the object recognition
strategies of deep neural networks with humans", NeurIPS 2022; serre-lab/harmonization). Checkpoints of
keras.applications itself expect Keras's 'tf' preprocessing (``x/127.5 - 1``): convert those with
``--norm inception``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from advalign_jax.models.base import (InputNorm, ModelDef, Normalize, batch_norm, compute_dtype, last_relu,
                                      maybe_remat)
from advalign_jax.models.importers import Importer, infer_num_classes, keras_bn, keras_conv, keras_dense
from advalign_jax.models.resnet import WIDTHS, conv


class PreActBottleneck(nn.Module):
    """Keras ``residual_block_v2``."""

    features: int
    stride: int = 1
    conv_shortcut: bool = False
    bn_eps: float = 1.001e-5
    bn_momentum: float = 0.99
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        bn = functools.partial(batch_norm, train, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=dtype)
        preact = nn.relu(bn("preact_bn")(x))
        if self.conv_shortcut:
            shortcut = conv(4 * self.features, 1, self.stride, "conv0", dtype, bias=True)(preact)
        else:
            shortcut = x[:, ::self.stride, ::self.stride, :] if self.stride > 1 else x
        y = nn.relu(bn("bn1")(conv(self.features, 1, 1, "conv1", dtype)(preact)))
        y = nn.relu(bn("bn2")(conv(self.features, 3, self.stride, "conv2", dtype)(y)))
        y = conv(4 * self.features, 1, 1, "conv3", dtype, bias=True)(y)
        return shortcut + y


class ResNetV2(nn.Module):
    """Pre-activation ResNet as in keras.applications (``layers`` blocks per stage; ResNet50V2: 3, 4, 6, 3)."""

    num_classes: int = 1000
    layers: Sequence[int] = (3, 4, 6, 3)
    norm: InputNorm = InputNorm()
    dtype: str = "float32"
    remat: bool = False
    bn_eps: float = 1.001e-5
    bn_momentum: float = 0.99
    fake_relu: bool = False  # the last ReLU (after post_bn) backward as the identity: base.fake_relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        x = Normalize(self.norm)(x).astype(dtype)
        x = conv(64, 7, 2, "conv1", dtype, bias=True)(x)
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # pool1_pad: zeros
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        block = maybe_remat(PreActBottleneck, self.remat)
        last = len(self.layers) - 1
        for s, (width, depth) in enumerate(zip(WIDTHS, self.layers)):
            for i in range(depth):
                stride = 2 if (i == depth - 1 and s < last) else 1
                x = block(width, stride, conv_shortcut=i == 0, bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
                          dtype=self.dtype, name=f"conv{s + 2}_block{i + 1}")(x, train)
            self.sow("intermediates", f"conv{s + 2}_out", x)
        x = last_relu(batch_norm(train, "post_bn", momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=dtype)(x),
                      self.fake_relu)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return nn.Dense(self.num_classes, dtype=dtype, name="predictions")(x)


def keras_rules(model) -> list:
    """keras.applications ResNet*V2 layer names -> flax variables."""
    rules = keras_conv("conv1", "conv1_conv")
    for s, depth in enumerate(model.module.layers):
        for i in range(depth):
            name = f"conv{s + 2}_block{i + 1}"
            p = f"{name}_"
            rules += keras_bn(f"{name}/preact_bn", p + "preact_bn")
            if i == 0:
                rules += keras_conv(f"{name}/conv0", p + "0_conv")
            rules += keras_conv(f"{name}/conv1", p + "1_conv", bias=False) + keras_bn(f"{name}/bn1", p + "1_bn")
            rules += keras_conv(f"{name}/conv2", p + "2_conv", bias=False) + keras_bn(f"{name}/bn2", p + "2_bn")
            rules += keras_conv(f"{name}/conv3", p + "3_conv")
    return rules + keras_bn("post_bn", "post_bn") + keras_dense("predictions", "predictions")


def _infer(weights) -> dict:
    n = infer_num_classes(weights, "predictions", "keras")
    return {} if n is None else {"num_classes": n}


MODELS = {
    "resnet50v2": ModelDef(
        name="resnet50v2", build=ResNetV2,
        options=dict(num_classes=1000, input_size=224, norm="imagenet", dtype="float32", remat=False,
                     layers=(3, 4, 6, 3), bn_eps=1.001e-5, bn_momentum=0.99),
        description="ResNet50V2, pre-activation (keras.applications; the harmonized release)",
        importers={"keras": Importer(rules=keras_rules, infer=_infer, norm="imagenet",
                                     description="keras.applications ResNet50V2 / the harmonized release")}),
}
