"""EfficientNet-B0: Keras ``keras.applications.EfficientNetB0``, the ``efficientnet`` package (qubvel,
``efficientnet.keras``/``efficientnet.tfkeras``; the harmonized EfficientNet-B0 ``.h5``) and timm
``efficientnet_b0``.

Architecture (Tan & Le 2019, B0): a 3x3 stride-2 stem conv (32) + BN + swish; seven stages of MBConv blocks
(expand ratio, kernel, stride, output width, repeats): (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2),
(6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1). A block is
[1x1 expand conv + BN + swish] -> depthwise kxk conv (stride on the first block of a stage) + BN + swish ->
squeeze-and-excitation (global mean, 1x1 conv to ``max(1, int(block_input_width * 0.25))`` + swish,
1x1 conv back + sigmoid, multiply) -> 1x1 project conv + BN (no activation) -> + input when the stride is 1
and the widths agree (with stochastic depth in training). Then a 1x1 conv to 1280 + BN + swish, global
average pooling, a linear head (dropout 0.2 before it in the originals' training). Convs have no bias
except the SE convs and the head. All three originals compute exactly this; they differ in:

- padding (option ``padding``): Keras pads stride-2 convs with ``ZeroPadding2D(correct_pad)`` then 'valid'
  (keras.applications) or uses ``padding='same'`` (the efficientnet package); both are TensorFlow "SAME"
  (the extra pixel after: (0, 1) for a 3x3 and (1, 2) for a 5x5 stride-2 conv on an even size), which is
  ``padding="tf"``. timm's ``efficientnet_b0`` (not the ``tf_`` variants) pads symmetrically by k//2:
  ``padding="torch"``. Stride-1 convs are symmetric either way.
- BatchNorm epsilon (``bn_eps``): 1e-3 in Keras (both), 1e-5 in timm; momentum 0.99 / 0.1 (flax 0.9).
- input normalisation, below.

Stochastic depth (``drop_path_rate``, default 0: training mode computes the same function as inference
apart from BatchNorm): block b of 16 drops its residual branch per example with probability
``drop_path_rate * b / 16`` and rescales kept ones by 1/(1-p) (Keras ``Dropout(noise_shape=(N,1,1,1))``,
timm ``drop_path``; both trained with 0.2); it needs a ``dropout`` rng. ``dropout_rate`` is the dropout
before the head (0.2 in the originals' training; 0 by default). Inference ignores both.

Flax parameter tree: ``stem_conv``, ``stem_bn``, ``block{1-7}{a,b,...}/{expand_conv, expand_bn, dwconv, bn,
se_reduce, se_expand, project_conv, project_bn}``, ``top_conv``, ``top_bn``, ``head`` (the Keras names).
Intermediates: ``stem_out``, ``stage{1-7}_out`` (Keras ``block1a_project_bn``, ``block2b_add``, ...,
``block7a_project_bn``), ``top_out`` (``top_activation``).

Importers:

- ``keras``: keras.applications names (``stem_conv``, ``stem_bn``, ``block1a_dwconv``, ``block1a_bn``,
  ``block1a_se_reduce``, ``block1a_se_expand``, ``block1a_project_conv``, ``block1a_project_bn``,
  ``block2a_expand_conv``, ..., ``top_conv``, ``top_bn``, ``predictions``) and the efficientnet package's,
  which are the same except the head ``probs`` and no preprocessing layers. The depthwise kernel is
  ``depthwise_kernel`` in Keras 2 files and ``kernel`` in Keras 3's. ``infer`` sets ``padding="tf"``,
  ``bn_eps=1e-3`` and the input normalisation:

  * keras.applications models normalise inside: ``Rescaling(1/255)``, ``Normalization`` (mean and variance
    stored in the file as ``normalization/mean``, ``normalization/variance``: ``(x - mean) /
    max(sqrt(variance), 1e-7)``), and, in models built with ``weights="imagenet"`` (Keras >= 2.10), a
    ``Rescaling(1/sqrt([0.229, 0.224, 0.225]))`` after it, which compensates the released weights'
    variance of [0.229, 0.224, 0.225] (standard deviations stored as variances). That Rescaling has no
    weights, so it is recognised by the released statistics: when the stored variance is
    [0.229, 0.224, 0.225] the import applies it (the model then computes exactly ``imagenet``
    normalisation); otherwise (``weights=None``, or adapted statistics) it does not. A model built with
    ``weights=None`` and later given the released weights (or saved by TF < 2.10) lacks the Rescaling; pass
    ``--norm`` to reproduce it exactly. The Keras model's [0, 255] input is our [0, 1] input times 255.
  * the efficientnet package's models have no preprocessing layers; the harmonized release expects
    ``imagenet`` normalisation, the default for files without a ``Normalization`` layer.

  The head is imported as logits (the Keras Dense's softmax is not applied).
- ``torch``: timm ``efficientnet_b0`` names: ``conv_stem``, ``bn1``; ``blocks.0.0.{conv_dw, bn1, se.conv_reduce,
  se.conv_expand, conv_pw, bn2}`` (the expand-ratio-1 block); ``blocks.{s}.{b}.{conv_pw, bn1, conv_dw, bn2,
  se.conv_reduce, se.conv_expand, conv_pwl, bn3}``; ``conv_head``, ``bn2``, ``classifier``. ``infer`` sets
  ``padding="torch"``, ``bn_eps=1e-5``, ``bn_momentum=0.9``; input normalisation ``imagenet``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.models.base import (InputNorm, ModelDef, Normalize, batch_norm, compute_dtype, maybe_remat,
                                      tf_same_pad)
from advalign_jax.models.importers import (Importer, ImportMismatch, infer_num_classes, keras_bn, keras_conv,
                                           keras_dense, torch_bn, torch_conv, torch_dense)

# (expand ratio, kernel, stride of the first block, output width, repeats) per stage.
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
             (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_WIDTH, TOP_WIDTH, SE_RATIO = 32, 1280, 0.25
PADDINGS = ("tf", "torch")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def conv_padding(mode: str, size: tuple, kernel: int, stride: int) -> tuple:
    """Explicit padding of a kxk conv on an input of spatial ``size``: TF "SAME" or PyTorch's k//2."""
    if mode == "tf":
        return tuple(tf_same_pad(int(n), kernel, stride) for n in size)
    if mode == "torch":
        return ((kernel - 1) // 2,) * 2, ((kernel - 1) // 2,) * 2
    raise ValueError(f"EfficientNet padding must be one of {PADDINGS}, got {mode!r}")


def block_specs(stages: Sequence = B0_STAGES):
    """[(stage 1-7, block letter index, input width, expand, kernel, stride, output width)] of every block."""
    out, width = [], STEM_WIDTH
    for s, (expand, kernel, stride, features, repeats) in enumerate(stages):
        for b in range(repeats):
            out.append((s + 1, b, width, expand, kernel, stride if b == 0 else 1, features))
            width = features
    return out


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (see the module docstring)."""

    in_features: int
    features: int
    expand: int
    kernel: int
    stride: int
    padding: str = "tf"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.99
    drop_path: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        bn = functools.partial(batch_norm, train, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=dtype)
        inputs = x
        width = self.in_features * self.expand
        if self.expand != 1:
            x = nn.Conv(width, (1, 1), use_bias=False, dtype=dtype, name="expand_conv")(x)
            x = nn.swish(bn("expand_bn")(x))
        pad = conv_padding(self.padding, x.shape[1:3], self.kernel, self.stride)
        x = nn.Conv(width, (self.kernel, self.kernel), strides=(self.stride, self.stride), padding=pad,
                    feature_group_count=width, use_bias=False, dtype=dtype, name="dwconv")(x)
        x = nn.swish(bn("bn")(x))
        se = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(dtype)
        se = nn.swish(nn.Conv(max(1, int(self.in_features * SE_RATIO)), (1, 1), dtype=dtype, name="se_reduce")(se))
        se = nn.sigmoid(nn.Conv(width, (1, 1), dtype=dtype, name="se_expand")(se))
        x = x * se
        x = bn("project_bn")(nn.Conv(self.features, (1, 1), use_bias=False, dtype=dtype, name="project_conv")(x))
        if self.stride == 1 and self.in_features == self.features:
            if train and self.drop_path > 0:
                keep = 1.0 - self.drop_path
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
                x = jnp.where(mask, x / keep, jnp.zeros_like(x))
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet (B0 stages by default); options as in the module docstring."""

    num_classes: int = 1000
    stages: Sequence = B0_STAGES
    padding: str = "tf"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.99
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    norm: InputNorm = InputNorm()
    dtype: str = "float32"
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        bn = functools.partial(batch_norm, train, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=dtype)
        x = Normalize(self.norm)(x).astype(dtype)
        pad = conv_padding(self.padding, x.shape[1:3], 3, 2)
        x = nn.Conv(STEM_WIDTH, (3, 3), strides=(2, 2), padding=pad, use_bias=False, dtype=dtype,
                    name="stem_conv")(x)
        x = nn.swish(bn("stem_bn")(x))
        self.sow("intermediates", "stem_out", x)
        block = maybe_remat(MBConv, self.remat)
        specs = block_specs(self.stages)
        for i, (stage, b, in_width, expand, kernel, stride, width) in enumerate(specs):
            x = block(in_width, width, expand, kernel, stride, self.padding, self.bn_eps, self.bn_momentum,
                      self.drop_path_rate * i / len(specs), self.dtype, name=f"block{stage}{chr(97 + b)}")(x, train)
            if i + 1 == len(specs) or specs[i + 1][0] != stage:
                self.sow("intermediates", f"stage{stage}_out", x)
        x = nn.Conv(TOP_WIDTH, (1, 1), use_bias=False, dtype=dtype, name="top_conv")(x)
        x = nn.swish(bn("top_bn")(x))
        self.sow("intermediates", "top_out", x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
        x = nn.Dropout(self.dropout_rate, deterministic=not train or self.dropout_rate == 0)(x)
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return nn.Dense(self.num_classes, dtype=dtype, name="head")(x)


# ----------------------------------------------------------------------------------------------------
# Import tables
# ----------------------------------------------------------------------------------------------------

def keras_rules(model) -> list:
    """Keras layer names (after :func:`keras_rename`) -> flax variables."""
    rules = keras_conv("stem_conv", "stem_conv", bias=False) + keras_bn("stem_bn", "stem_bn")
    for stage, b, _, expand, _, _, _ in block_specs(model.module.stages):
        name = f"block{stage}{chr(97 + b)}"
        if expand != 1:
            rules += keras_conv(f"{name}/expand_conv", f"{name}_expand_conv", bias=False)
            rules += keras_bn(f"{name}/expand_bn", f"{name}_expand_bn")
        rules += keras_conv(f"{name}/dwconv", f"{name}_dwconv", bias=False, depthwise=True)
        rules += keras_bn(f"{name}/bn", f"{name}_bn")
        rules += keras_conv(f"{name}/se_reduce", f"{name}_se_reduce") + keras_conv(f"{name}/se_expand",
                                                                                   f"{name}_se_expand")
        rules += keras_conv(f"{name}/project_conv", f"{name}_project_conv", bias=False)
        rules += keras_bn(f"{name}/project_bn", f"{name}_project_bn")
    rules += keras_conv("top_conv", "top_conv", bias=False) + keras_bn("top_bn", "top_bn")
    return rules + keras_dense("head", "predictions")


def _normalization_layer(weights) -> str | None:
    """Name of the keras.applications ``Normalization`` layer (auto-named ``normalization[_N]``), if any."""
    names = sorted({k.split("/")[0] for k in weights if k.split("/")[0].startswith("normalization")
                    and k.endswith("/variance")})
    if len(names) > 1:
        raise ImportMismatch(f"several Normalization layers in the checkpoint: {', '.join(names)}")
    return names[0] if names else None


def keras_rename(weights) -> dict:
    """Canonical names: Keras 3's depthwise ``kernel`` -> ``depthwise_kernel``; the efficientnet package's
    head ``probs`` -> ``predictions``; the Normalization layer's statistics dropped (``infer`` read them)."""
    norm_layer = _normalization_layer(weights)
    out = {}
    for key, value in weights.items():
        layer, _, weight = key.rpartition("/")
        if norm_layer is not None and layer == norm_layer:
            continue
        if layer.endswith("_dwconv") and weight == "kernel":
            key = f"{layer}/depthwise_kernel"
        elif layer == "probs" and "predictions/kernel" not in weights:
            key = f"predictions/{weight}"
        out[key] = value
    return out


def keras_norm(weights) -> InputNorm | str:
    """The input normalisation a Keras EfficientNet checkpoint computes (see the module docstring)."""
    layer = _normalization_layer(weights)
    if layer is None:
        return "imagenet"  # the efficientnet package: preprocessing outside the model
    mean = np.asarray(weights[f"{layer}/mean"], np.float64).reshape(-1)
    std = np.maximum(np.sqrt(np.asarray(weights[f"{layer}/variance"], np.float64).reshape(-1)), 1e-7)
    if mean.shape != (3,) or std.shape != (3,):
        raise ImportMismatch(f"{layer}: expected per-channel RGB statistics, got mean {mean.shape} and "
                             f"variance {std.shape}")
    variance = np.asarray(weights[f"{layer}/variance"], np.float64).reshape(-1)
    if np.allclose(variance, IMAGENET_STD, rtol=1e-6, atol=0) and np.allclose(mean, IMAGENET_MEAN, rtol=1e-6,
                                                                             atol=0):
        # keras.applications built with weights="imagenet": the released statistics + Rescaling(1/sqrt(std))
        std = std * np.sqrt(IMAGENET_STD)
    return InputNorm(tuple(float(m) for m in mean), tuple(float(s) for s in std))


def keras_infer(weights) -> dict:
    options = {"padding": "tf", "bn_eps": 1e-3, "bn_momentum": 0.99, "norm": keras_norm(weights)}
    n = infer_num_classes(weights, "predictions" if "predictions/kernel" in weights else "probs", "keras")
    if n is not None:
        options["num_classes"] = n
    return options


def torch_rules(model) -> list:
    """timm ``efficientnet_b0`` state-dict names -> flax variables."""
    rules = torch_conv("stem_conv", "conv_stem") + torch_bn("stem_bn", "bn1")
    for stage, b, _, expand, _, _, _ in block_specs(model.module.stages):
        name, src = f"block{stage}{chr(97 + b)}", f"blocks.{stage - 1}.{b}"
        se = torch_conv(f"{name}/se_reduce", f"{src}.se.conv_reduce", bias=True)
        se += torch_conv(f"{name}/se_expand", f"{src}.se.conv_expand", bias=True)
        if expand == 1:  # timm's DepthwiseSeparableConv
            rules += torch_conv(f"{name}/dwconv", f"{src}.conv_dw") + torch_bn(f"{name}/bn", f"{src}.bn1") + se
            rules += torch_conv(f"{name}/project_conv", f"{src}.conv_pw")
            rules += torch_bn(f"{name}/project_bn", f"{src}.bn2")
        else:  # InvertedResidual
            rules += torch_conv(f"{name}/expand_conv", f"{src}.conv_pw") + torch_bn(f"{name}/expand_bn", f"{src}.bn1")
            rules += torch_conv(f"{name}/dwconv", f"{src}.conv_dw") + torch_bn(f"{name}/bn", f"{src}.bn2") + se
            rules += torch_conv(f"{name}/project_conv", f"{src}.conv_pwl")
            rules += torch_bn(f"{name}/project_bn", f"{src}.bn3")
    rules += torch_conv("top_conv", "conv_head") + torch_bn("top_bn", "bn2")
    return rules + torch_dense("head", "classifier")


def torch_infer(weights) -> dict:
    options = {"padding": "torch", "bn_eps": 1e-5, "bn_momentum": 0.9}
    n = infer_num_classes(weights, "classifier", "torch")
    if n is not None:
        options["num_classes"] = n
    return options


KERAS = Importer(rules=keras_rules, infer=keras_infer, rename=keras_rename, norm=None,
                 description="keras.applications EfficientNetB0 (its Rescaling + Normalization read from the "
                             "file) or the efficientnet package / harmonized .h5 (imagenet normalisation)")
TORCH = Importer(rules=torch_rules, infer=torch_infer, ignore=("num_batches_tracked",), norm="imagenet",
                 description="timm efficientnet_b0 state dicts (symmetric padding, BN eps 1e-5)")

MODELS = {
    "efficientnet_b0": ModelDef(
        name="efficientnet_b0", build=EfficientNet,
        options=dict(num_classes=1000, input_size=224, norm="imagenet", dtype="float32", remat=False,
                     padding="tf", bn_eps=1e-3, bn_momentum=0.99, drop_path_rate=0.0, dropout_rate=0.0),
        description="EfficientNet-B0 (keras.applications, efficientnet package / harmonized, timm)",
        importers={"keras": KERAS, "torch": TORCH}),
}
