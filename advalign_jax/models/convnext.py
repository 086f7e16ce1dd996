"""ConvNeXt-Tiny (Liu et al. 2022): timm ``convnext_tiny``, ``keras.applications.ConvNeXtTiny`` and the
keras-cv-attention-models (kecam) ``ConvNeXtTiny`` of the harmonized release.

Architecture (identical in the three originals): a 4x4 stride-4 'valid' conv stem with bias + LayerNorm;
four stages of depths 3/3/9/3 and widths 96/192/384/768, stages 2-4 starting with a downsampling
LayerNorm + 2x2 stride-2 'valid' conv; each block is
``x + gamma * Dense(w) . GELU . Dense(4w) . LN . dwconv7x7(x)`` (depthwise 7x7 conv with bias, padding
3 on every side: PyTorch ``padding=3``, Keras ``padding="same"`` at stride 1, kecam's explicit
``ZeroPadding2D(3)``), GELU exact (erf), layer scale ``gamma`` per channel (initialised 1e-6); a head of
global average pooling, LayerNorm and a linear layer. Every LayerNorm has epsilon 1e-6 and normalises
over channels. The model is size-agnostic (any input that survives the 32x downsampling).

Stochastic depth (``drop_path_rate``, 0 by default): in training only, block ``k`` of ``n`` drops its
residual branch per example with probability ``drop_path_rate * k / (n - 1)`` (timm's and Keras's linear
schedule) and scales kept branches by ``1 / (1 - p)``; it needs a ``dropout`` rng
(``model.apply_train(variables, x, rng=key)``). Inference ignores it.

Flax parameter tree: ``stem_conv``, ``stem_norm``, ``downsample{1-3}_norm``, ``downsample{1-3}_conv``,
``stage{0-3}_block{j}/{dwconv, norm, fc1, fc2, gamma}``, ``head_norm``, ``head``. Intermediates:
``stem_out`` and ``stage{0-3}_out``.

Importers:

- ``torch``: timm names ``stem.0`` (conv), ``stem.1`` (LayerNorm2d), ``stages.{i}.downsample.0`` (LN) /
  ``.1`` (conv), ``stages.{i}.blocks.{j}.conv_dw``, ``.norm``, ``.mlp.fc1``, ``.mlp.fc2``, ``.gamma``,
  ``head.norm``, ``head.fc``; default normalisation ``imagenet`` (timm's pretrained config).
- ``keras``: two layouts, told apart by their names (``infer``):

  * kecam (the harmonized ConvNeXt-Tiny): ``stem_conv``, ``stem_ln``, ``stack{2-4}_downsample_ln``,
    ``stack{2-4}_downsample_conv``, ``stack{s}_block{b}_dw_conv`` (DepthwiseConv2D, kernel (7, 7, C, 1),
    called ``depthwise_kernel`` by Keras 2 and ``kernel`` by Keras 3), ``_ln``, ``_up_dense``,
    ``_down_dense``, ``_gamma/weight``, ``head_ln``, ``predictions`` (stacks and blocks counted from 1).
    kecam models have no preprocessing layer; default normalisation ``imagenet`` (the harmonized
    training's ``(x/255 - mean)/std``).
  * keras.applications (``{P}`` is the model's name, ``convnext_tiny`` by default):
    ``{P}_stem[/]{P}_stem_conv`` and ``_stem_layernorm`` (the stem is a nested Sequential),
    ``{P}_downsampling_block_{i}[/]{P}_downsampling_layernorm_{i}`` / ``_downsampling_conv_{i}``,
    ``{P}_stage_{i}_block_{j}_depthwise_conv`` (a grouped Conv2D, kernel (7, 7, 1, C)), ``_layernorm``,
    ``_pointwise_conv_1``, ``_pointwise_conv_2``, ``_layer_scale`` (one unnamed variable: Keras calls it
    ``variable``, ``variable_17``, ``Variable``...), ``{P}_head_layernorm``, ``{P}_head_dense``
    (stages and blocks counted from 0); from a Keras 3 ``.keras`` archive the stem and downsampling
    weights arrive as ``{P}_stem/kernel``, ``{P}_downsampling_block_{i}/gamma``... ``rename`` maps all of
    these onto the kecam names (transposing the grouped-conv kernel into the depthwise layout), so error
    messages speak kecam's names.
    With ``include_preprocessing=True`` (the default) the saved model starts with a ``Normalization``
    layer on 0..255 input, mean ``255 * (0.485, 0.456, 0.406)`` and variance
    ``(255 * (0.229, 0.224, 0.225))**2`` (stored in the config, not as weights); the importer's
    normalisation reproduces it exactly (``x * 255``, those means, ``sqrt`` of the float32 variances),
    or uses the stored ``mean``/``variance`` weights of an adapted layer. A model built with
    ``include_preprocessing=False`` expects whatever its training used: pass ``--norm``.

  Both import the head as logits (a Keras softmax is not applied). Checked against Keras 2 files
  (tf_keras 2.21: kecam 1.4.3 and keras.applications) and Keras 3.15 files (``.h5`` and ``.keras``).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.models.base import InputNorm, ModelDef, Normalize, compute_dtype, maybe_remat
from advalign_jax.models.importers import (Importer, Rule, infer_num_classes, keras_conv, keras_dense, keras_ln,
                                           torch_conv, torch_dense, torch_ln)

LN_EPS = 1e-6


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


class ConvNeXtBlock(nn.Module):
    """``x + drop_path(gamma * fc2(gelu(fc1(LN(dwconv7x7(x))))))``."""

    dim: int
    drop_path: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        y = nn.Conv(self.dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=self.dim, dtype=dtype,
                    name="dwconv")(x)
        y = _layer_norm("norm", dtype)(y)
        y = nn.gelu(nn.Dense(4 * self.dim, dtype=dtype, name="fc1")(y), approximate=False)
        y = nn.Dense(self.dim, dtype=dtype, name="fc2")(y)
        gamma = self.param("gamma", nn.initializers.constant(1e-6), (self.dim,), jnp.float32)
        y = y * gamma.astype(dtype)
        if train and self.drop_path > 0.0:
            keep = 1.0 - self.drop_path
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
            y = jnp.where(mask, y / jnp.asarray(keep, dtype), jnp.zeros_like(y))
        return x + y


class ConvNeXt(nn.Module):
    num_classes: int = 1000
    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    drop_path_rate: float = 0.0
    norm: InputNorm = InputNorm()
    dtype: str = "float32"
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        x = Normalize(self.norm)(x).astype(dtype)
        x = nn.Conv(self.dims[0], (4, 4), strides=(4, 4), padding="VALID", dtype=dtype, name="stem_conv")(x)
        x = _layer_norm("stem_norm", dtype)(x)
        self.sow("intermediates", "stem_out", x)
        total = sum(self.depths)
        rates = np.linspace(0.0, self.drop_path_rate, total) if total > 1 else np.zeros(total)
        block = maybe_remat(ConvNeXtBlock, self.remat)
        k = 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if i > 0:
                x = _layer_norm(f"downsample{i}_norm", dtype)(x)
                x = nn.Conv(dim, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype, name=f"downsample{i}_conv")(x)
            for j in range(depth):
                x = block(dim, drop_path=float(rates[k]), dtype=self.dtype, name=f"stage{i}_block{j}")(x, train)
                k += 1
            self.sow("intermediates", f"stage{i}_out", x)
        x = jnp.mean(x, axis=(1, 2))
        x = _layer_norm("head_norm", dtype)(x)
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return nn.Dense(self.num_classes, dtype=dtype, name="head")(x)


# ----------------------------------------------------------------------------------------------------
# Importers
# ----------------------------------------------------------------------------------------------------

def torch_rules(model) -> list:
    m = model.module
    rules = torch_conv("stem_conv", "stem.0", bias=True) + torch_ln("stem_norm", "stem.1")
    for i, depth in enumerate(m.depths):
        if i > 0:
            rules += torch_ln(f"downsample{i}_norm", f"stages.{i}.downsample.0")
            rules += torch_conv(f"downsample{i}_conv", f"stages.{i}.downsample.1", bias=True)
        for j in range(depth):
            src, dst = f"stages.{i}.blocks.{j}", f"stage{i}_block{j}"
            rules += torch_conv(f"{dst}/dwconv", f"{src}.conv_dw", bias=True)
            rules += torch_ln(f"{dst}/norm", f"{src}.norm")
            rules += torch_dense(f"{dst}/fc1", f"{src}.mlp.fc1") + torch_dense(f"{dst}/fc2", f"{src}.mlp.fc2")
            rules.append(Rule(f"params/{dst}/gamma", f"{src}.gamma"))
    return rules + torch_ln("head_norm", "head.norm") + torch_dense("head", "head.fc")


def keras_rules(model) -> list:
    """The kecam table (stacks/blocks from 1); keras.applications names arrive renamed (:func:`keras_rename`)."""
    m = model.module
    rules = keras_conv("stem_conv", "stem_conv") + keras_ln("stem_norm", "stem_ln")
    for i, depth in enumerate(m.depths):
        stack = f"stack{i + 1}"
        if i > 0:
            rules += keras_ln(f"downsample{i}_norm", f"{stack}_downsample_ln")
            rules += keras_conv(f"downsample{i}_conv", f"{stack}_downsample_conv")
        for j in range(depth):
            src, dst = f"{stack}_block{j + 1}", f"stage{i}_block{j}"
            rules += keras_conv(f"{dst}/dwconv", f"{src}_dw_conv", depthwise=True)
            rules += keras_ln(f"{dst}/norm", f"{src}_ln")
            rules += keras_dense(f"{dst}/fc1", f"{src}_up_dense") + keras_dense(f"{dst}/fc2", f"{src}_down_dense")
            rules.append(Rule(f"params/{dst}/gamma", f"{src}_gamma/weight"))
    return rules + keras_ln("head_norm", "head_ln") + keras_dense("head", "predictions")


def _keras_app_prefix(weights: Mapping):
    """The model-name prefix of keras.applications names (``convnext_tiny``), or None."""
    for name in weights:
        found = re.match(r"^(?:.*/)?(.+)_stem_conv/kernel$", name) or re.match(r"^(.+)_stem/kernel$", name)
        if found and found.group(1) != "stem":
            return found.group(1)
    return None


def _keras_app_name(name: str, prefix: str):
    """One keras.applications name -> (kecam name, transform) or None when it is not a ConvNeXt weight."""
    p = re.escape(prefix)
    nested = [  # a .keras archive read by layer: the nested Sequential's name and the bare weight name
        (rf"^{p}_stem/(kernel|bias)$", lambda g: f"stem_conv/{g[0]}"),
        (rf"^{p}_stem/(gamma|beta)$", lambda g: f"stem_ln/{g[0]}"),
        (rf"^{p}_downsampling_block_(\d+)/(gamma|beta)$", lambda g: f"stack{int(g[0]) + 2}_downsample_ln/{g[1]}"),
        (rf"^{p}_downsampling_block_(\d+)/(kernel|bias)$", lambda g: f"stack{int(g[0]) + 2}_downsample_conv/{g[1]}"),
    ]
    for pattern, target in nested:
        found = re.match(pattern, name)
        if found:
            return target(found.groups())
    name = re.sub(rf"^{p}_(stem|downsampling_block_\d+)/", "", name)  # the nested Sequential's group (.h5)
    table = [
        (rf"^{p}_stem_conv/(kernel|bias)$", lambda g: f"stem_conv/{g[0]}"),
        (rf"^{p}_stem_layernorm/(gamma|beta)$", lambda g: f"stem_ln/{g[0]}"),
        (rf"^{p}_downsampling_layernorm_(\d+)/(gamma|beta)$", lambda g: f"stack{int(g[0]) + 2}_downsample_ln/{g[1]}"),
        (rf"^{p}_downsampling_conv_(\d+)/(kernel|bias)$", lambda g: f"stack{int(g[0]) + 2}_downsample_conv/{g[1]}"),
        (rf"^{p}_stage_(\d+)_block_(\d+)_depthwise_conv/kernel$", lambda g: f"{_blk(g)}_dw_conv/depthwise_kernel"),
        (rf"^{p}_stage_(\d+)_block_(\d+)_depthwise_conv/bias$", lambda g: f"{_blk(g)}_dw_conv/bias"),
        (rf"^{p}_stage_(\d+)_block_(\d+)_layernorm/(gamma|beta)$", lambda g: f"{_blk(g)}_ln/{g[2]}"),
        (rf"^{p}_stage_(\d+)_block_(\d+)_pointwise_conv_1/(kernel|bias)$", lambda g: f"{_blk(g)}_up_dense/{g[2]}"),
        (rf"^{p}_stage_(\d+)_block_(\d+)_pointwise_conv_2/(kernel|bias)$", lambda g: f"{_blk(g)}_down_dense/{g[2]}"),
        (rf"^{p}_stage_(\d+)_block_(\d+)_layer_scale/[^/]+$", lambda g: f"{_blk(g)}_gamma/weight"),
        (rf"^{p}_head_layernorm/(gamma|beta)$", lambda g: f"head_ln/{g[0]}"),
        (rf"^{p}_head_dense/(kernel|bias)$", lambda g: f"predictions/{g[0]}"),
    ]
    for pattern, target in table:
        found = re.match(pattern, name)
        if found:
            return target(found.groups())
    return None


def _blk(groups) -> str:
    return f"stack{int(groups[0]) + 1}_block{int(groups[1]) + 1}"


def keras_rename(weights: Mapping) -> dict:
    """keras.applications and Keras-3 kecam names -> kecam's Keras 2 names (what :func:`keras_rules` reads)."""
    prefix = _keras_app_prefix(weights)
    out = {}
    for name, value in weights.items():
        target = _keras_app_name(name, prefix) if prefix else None
        if target is not None and target.endswith("_dw_conv/depthwise_kernel"):
            value = np.transpose(np.asarray(value), (0, 1, 3, 2))  # grouped Conv2D (7,7,1,C) -> (7,7,C,1)
        elif target is None:
            target = re.sub(r"_dw_conv/kernel$", "_dw_conv/depthwise_kernel", name)  # kecam under Keras 3
        out[target if target not in out else name] = value
    return out


def keras_app_norm(weights: Mapping, prefix: str) -> InputNorm:
    """What keras.applications ConvNeXt's ``{prefix}_prestem_normalization`` computes on 0..255 input."""
    mean = weights.get(f"{prefix}_prestem_normalization/mean")
    var = weights.get(f"{prefix}_prestem_normalization/variance")
    if mean is None or var is None:
        mean = np.float32([0.485 * 255, 0.456 * 255, 0.406 * 255])
        var = np.float32([(0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2])
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.maximum(np.sqrt(np.asarray(var, np.float32).reshape(-1)), np.float32(1e-7))  # Keras's epsilon floor
    return InputNorm(tuple(float(m) for m in mean), tuple(float(s) for s in std), scale=255.0)


def torch_infer(weights: Mapping) -> dict:
    n = infer_num_classes(weights, "head.fc", "torch")
    return {} if n is None else {"num_classes": n}


def keras_infer(weights: Mapping) -> dict:
    prefix = _keras_app_prefix(weights)
    options = {"norm": keras_app_norm(weights, prefix) if prefix else "imagenet"}
    n = infer_num_classes(keras_rename(weights), "predictions", "keras")
    if n is not None:
        options["num_classes"] = n
    return options


TORCH = Importer(rules=torch_rules, infer=torch_infer, norm="imagenet",
                 description="timm ConvNeXt state dict (convnext_tiny)")
KERAS = Importer(rules=keras_rules, infer=keras_infer, rename=keras_rename, ignore=("_prestem_normalization/",),
                 description="kecam ConvNeXtTiny (harmonized release) or keras.applications.ConvNeXtTiny (.h5)")

MODELS = {
    "convnext_tiny": ModelDef(
        name="convnext_tiny", build=ConvNeXt,
        options=dict(num_classes=1000, input_size=224, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                     drop_path_rate=0.0, norm="imagenet", dtype="float32", remat=False),
        description="ConvNeXt-Tiny (timm convnext_tiny; keras.applications and kecam ConvNeXtTiny)",
        importers={"torch": TORCH, "keras": KERAS}),
}
