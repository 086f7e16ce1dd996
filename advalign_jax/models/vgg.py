"""VGG-16 and VGG-16-BN: torchvision ``vgg16``/``vgg16_bn``, timm ``vgg16``/``vgg16_bn`` and Keras
``keras.applications.VGG16`` (and the harmonized VGG16 ``.h5``, which has the same layer names).

Architecture (configuration "D" of Simonyan & Zisserman): five stages of 3x3 convolutions (padding 1,
with bias; 2, 2, 3, 3, 3 convs of widths 64, 128, 256, 512, 512), each conv followed by ReLU (``vgg16_bn``:
conv + BatchNorm (eps 1e-5) + ReLU, the conv keeping its bias as in torchvision/timm), each stage closed by
a 2x2 stride-2 max-pool (floor). Then a 7x7x512 -> 4096 -> 4096 -> classes MLP head with ReLUs (dropout 0.5
in the originals' training; ``dropout_rate`` here, 0 by default).

The three originals agree at 224x224 input (7x7 features) and differ elsewhere; option ``head`` picks one:

- ``"torchvision"``: ``AdaptiveAvgPool2d((7, 7))`` then flatten and ``classifier.0/3/6`` (Linear). At 224 the
  pool is the identity; at other sizes it averages PyTorch's adaptive bins (bin i covers
  ``[floor(i*n/7), ceil((i+1)*n/7))``; smaller maps are replicated up to 7x7), reproduced exactly here.
- ``"timm"``: ``pre_logits.fc1`` is a 7x7 'valid' conv and ``pre_logits.fc2`` a 1x1 conv (ReLU after each),
  then global average pooling and ``head.fc``. Maps smaller than 7x7 are first adaptively average-pooled
  up to 7x7; larger maps slide the 7x7 conv and average its outputs.
- ``"keras"``: flatten then ``fc1``/``fc2``/``predictions``; Keras's VGG16 with its top accepts only 224x224
  (7x7 features), so other sizes raise an error here too.

Flatten order: PyTorch flattens (C, H, W), Keras and this module (H, W, C); the torch importers permute the
columns of the first Linear (and reshape timm's 7x7 conv) into our ``fc1`` kernel of shape
(7*7*512, 4096) in (H, W, C) row order, which is Keras's layout as it is.

Flax parameter tree: ``block{1-5}/conv{j}`` (+ ``bn{j}`` for ``vgg16_bn``), ``fc1``, ``fc2``, ``head``.
Intermediates: ``block{1-5}_out`` (after each stage's max-pool; Keras ``block{s}_pool``) and ``fc2_out``.

Importers (``infer`` also reads ``num_classes`` and ``hidden``, 4096 in the originals, off the head's shapes):

- ``torch``: torchvision names ``features.{i}.weight/bias`` (BatchNorm ``features.{i}.weight/bias/
  running_mean/running_var``; index i counts every conv, BN, ReLU and pool module), ``classifier.{0,3,6}``;
  or timm names (same ``features``; ``pre_logits.fc1/fc2``, ``head.fc``), detected from the names
  (``infer`` sets ``head``). Input normalisation ``imagenet``.
- ``keras`` (``vgg16`` only): ``block{s}_conv{j}``, ``fc1``, ``fc2``, ``predictions`` (imported as logits:
  Keras's softmax is not applied). The default normalisation is ``imagenet``, the harmonized release's
  convention; keras.applications's own ImageNet weights expect ``caffe`` (pass ``--norm caffe``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.models.base import (InputNorm, ModelDef, Normalize, batch_norm, compute_dtype, last_relu,
                                      maybe_remat)
from advalign_jax.models.importers import (Importer, Rule, infer_num_classes, keras_conv, keras_dense, torch_bn,
                                           torch_conv, torch_dense)

# Configuration "D": convs per stage and their width.
VGG16_STAGES = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
HEADS = ("torchvision", "timm", "keras")
POOLED = 7  # spatial side the head expects (224 / 32)


def adaptive_avg_pool(x, out_h: int, out_w: int):
    """PyTorch's ``adaptive_avg_pool2d`` on NHWC: output bin i averages input rows
    ``[floor(i*h/out_h), ceil((i+1)*h/out_h))`` (likewise columns); the identity when sizes agree."""
    _, h, w, _ = x.shape
    if (h, w) == (out_h, out_w):
        return x
    rows = [jnp.mean(x[:, (i * h) // out_h: -(-((i + 1) * h) // out_h)], axis=1) for i in range(out_h)]
    x = jnp.stack(rows, axis=1)
    cols = [jnp.mean(x[:, :, (j * w) // out_w: -(-((j + 1) * w) // out_w)], axis=2) for j in range(out_w)]
    return jnp.stack(cols, axis=2)


class VGGStage(nn.Module):
    """``convs`` 3x3 convs (padding 1, bias) [+ BatchNorm] + ReLU, then a 2x2 stride-2 max-pool."""

    convs: int
    features: int
    batch_norm: bool = False
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        for j in range(1, self.convs + 1):
            x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=f"conv{j}")(x)
            if self.batch_norm:
                x = batch_norm(train, f"bn{j}", momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=dtype)(x)
            x = nn.relu(x)
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class PooledDense(nn.Module):
    """The first head layer: a (7*7*C, features) kernel in (H, W, C) row order, applied to the flattened
    7x7 map (``as_conv=False``) or as a 7x7 'valid' convolution (``as_conv=True``, timm)."""

    features: int
    as_conv: bool = False
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        dtype = compute_dtype(self.dtype)
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOLED * POOLED * channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        kernel, bias, x = kernel.astype(dtype), bias.astype(dtype), x.astype(dtype)
        if self.as_conv:
            y = jax.lax.conv_general_dilated(x, kernel.reshape(POOLED, POOLED, channels, self.features), (1, 1),
                                             "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            y = x.reshape(x.shape[0], -1) @ kernel
        return y + bias


class VGG(nn.Module):
    """VGG with configuration ``stages`` ((convs, width) per stage); ``head`` as in the module docstring."""

    num_classes: int = 1000
    stages: Sequence = VGG16_STAGES
    batch_norm: bool = False
    head: str = "torchvision"
    hidden: int = 4096
    dropout_rate: float = 0.0
    norm: InputNorm = InputNorm()
    dtype: str = "float32"
    remat: bool = False
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    fake_relu: bool = False  # the last ReLU (fc2's) backward as the identity: base.fake_relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.head not in HEADS:
            raise ValueError(f"VGG head must be one of {HEADS}, got {self.head!r}")
        dtype = compute_dtype(self.dtype)
        x = Normalize(self.norm)(x).astype(dtype)
        stage = maybe_remat(VGGStage, self.remat)
        for s, (convs, width) in enumerate(self.stages):
            x = stage(convs, width, self.batch_norm, self.bn_eps, self.bn_momentum, self.dtype,
                      name=f"block{s + 1}")(x, train)
            self.sow("intermediates", f"block{s + 1}_out", x)
        drop = functools.partial(nn.Dropout(self.dropout_rate), deterministic=not train or self.dropout_rate == 0)
        if self.head == "timm":
            if x.shape[1] < POOLED or x.shape[2] < POOLED:
                x = adaptive_avg_pool(x, max(POOLED, x.shape[1]), max(POOLED, x.shape[2]))
            x = drop(nn.relu(PooledDense(self.hidden, as_conv=True, dtype=self.dtype, name="fc1")(x)))
            x = last_relu(nn.Dense(self.hidden, dtype=dtype, name="fc2")(x), self.fake_relu)
            x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
        else:
            if self.head == "keras" and x.shape[1:3] != (POOLED, POOLED):
                raise ValueError(f"Keras VGG16's head takes 7x7 features (224x224 input), got {x.shape[1:3]}; "
                                 "build with head='torchvision' for other sizes")
            x = adaptive_avg_pool(x, POOLED, POOLED)
            x = drop(nn.relu(PooledDense(self.hidden, dtype=self.dtype, name="fc1")(x)))
            x = last_relu(nn.Dense(self.hidden, dtype=dtype, name="fc2")(x), self.fake_relu)
        self.sow("intermediates", "fc2_out", x)
        x = drop(x)
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return nn.Dense(self.num_classes, dtype=dtype, name="head")(x)


# ----------------------------------------------------------------------------------------------------
# Import tables
# ----------------------------------------------------------------------------------------------------

def _torch_feature_indices(module) -> list:
    """[(stage 1-5, conv j, conv index, BN index or None)] in torchvision's ``features`` Sequential, which
    holds conv, [BN,] ReLU per conv and one MaxPool per stage."""
    out, i = [], 0
    for s, (convs, _) in enumerate(module.stages):
        for j in range(1, convs + 1):
            out.append((s + 1, j, i, i + 1 if module.batch_norm else None))
            i += 3 if module.batch_norm else 2
        i += 1  # max-pool
    return out


def _fc1_from_torch(w):
    """torchvision ``classifier.0.weight`` (out, C*7*7) or timm ``pre_logits.fc1.weight`` (out, C, 7, 7)
    -> our (7*7*C, out) kernel in (H, W, C) row order."""
    out = w.shape[0]
    w = w.reshape(out, -1, POOLED, POOLED)
    return np.transpose(w, (2, 3, 1, 0)).reshape(-1, out)


def _fc2_from_timm(w):  # a 1x1 conv (out, in, 1, 1) -> (in, out)
    return np.transpose(w[:, :, 0, 0], (1, 0))


def torch_rules(model) -> list:
    module = model.module
    rules = []
    for s, j, conv_i, bn_i in _torch_feature_indices(module):
        rules += torch_conv(f"block{s}/conv{j}", f"features.{conv_i}", bias=True)
        if bn_i is not None:
            rules += torch_bn(f"block{s}/bn{j}", f"features.{bn_i}")
    if module.head == "timm":
        rules += [Rule("params/fc1/kernel", "pre_logits.fc1.weight", _fc1_from_torch),
                  Rule("params/fc1/bias", "pre_logits.fc1.bias"),
                  Rule("params/fc2/kernel", "pre_logits.fc2.weight", _fc2_from_timm),
                  Rule("params/fc2/bias", "pre_logits.fc2.bias")]
        return rules + torch_dense("head", "head.fc")
    rules += [Rule("params/fc1/kernel", "classifier.0.weight", _fc1_from_torch),
              Rule("params/fc1/bias", "classifier.0.bias")]
    return rules + torch_dense("fc2", "classifier.3") + torch_dense("head", "classifier.6")


def torch_infer(weights) -> dict:
    """timm names (``pre_logits.fc1``/``head.fc``) or torchvision's (``classifier.*``); BatchNorm present?"""
    timm = "pre_logits.fc1.weight" in weights or "head.fc.weight" in weights
    options = {"head": "timm" if timm else "torchvision"}
    n = infer_num_classes(weights, "head.fc" if timm else "classifier.6", "torch")
    if n is not None:
        options["num_classes"] = n
    fc1 = weights.get("pre_logits.fc1.weight" if timm else "classifier.0.weight")
    if fc1 is not None:
        options["hidden"] = int(fc1.shape[0])
    return options


def keras_rules(model) -> list:
    rules = []
    for s, (convs, _) in enumerate(model.module.stages):
        for j in range(1, convs + 1):
            rules += keras_conv(f"block{s + 1}/conv{j}", f"block{s + 1}_conv{j}")
    return rules + keras_dense("fc1", "fc1") + keras_dense("fc2", "fc2") + keras_dense("head", "predictions")


def keras_infer(weights) -> dict:
    options = {"head": "keras"}
    n = infer_num_classes(weights, "predictions", "keras")
    if n is not None:
        options["num_classes"] = n
    if "fc1/kernel" in weights:
        options["hidden"] = int(weights["fc1/kernel"].shape[-1])
    return options


TORCH = Importer(rules=torch_rules, infer=torch_infer, ignore=("num_batches_tracked",), norm="imagenet",
                 description="torchvision or timm VGG state dicts")
KERAS = Importer(rules=keras_rules, infer=keras_infer, norm="imagenet",
                 description="keras.applications VGG16 / the harmonized VGG16 .h5 (keras.applications "
                             "weights expect --norm caffe)")


def _def(name: str, bn: bool, importers: dict, description: str) -> ModelDef:
    return ModelDef(
        name=name, build=VGG,
        options=dict(num_classes=1000, input_size=224, norm="imagenet", dtype="float32", remat=False,
                     batch_norm=bn, head="torchvision", hidden=4096, dropout_rate=0.0,
                     bn_eps=1e-5, bn_momentum=0.9),
        description=description, importers=importers)


MODELS = {
    "vgg16": _def("vgg16", False, {"torch": TORCH, "keras": KERAS},
                  "VGG-16 (torchvision / timm / keras.applications VGG16, harmonized VGG16)"),
    "vgg16_bn": _def("vgg16_bn", True, {"torch": TORCH}, "VGG-16 with BatchNorm (torchvision / timm)"),
}
