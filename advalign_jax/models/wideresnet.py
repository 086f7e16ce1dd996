"""WideResNet in the layout of TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness
and Accuracy", ICML 2019; yaodongyu/TRADES ``models/wideresnet.py``), the architecture of Zagoruyko &
Komodakis, "Wide Residual Networks", BMVC 2016.

WRN-``depth``-``widen_factor`` (``depth = 6 n + 4``: ``n`` blocks per group):

- stem: 3x3 conv (stride 1, padding 1, no bias) to 16 channels;
- three groups of ``n`` pre-activation BasicBlocks, widths ``16 k``, ``32 k``, ``64 k``
  (``k = widen_factor``), stride 1, 2, 2 in the first block of each group; a block with input ``x``::

      a   = relu(bn1(x))
      out = conv2(dropout(relu(bn2(conv1(a)))))           conv1 3x3 with the stride, conv2 3x3
      y   = x + out                 where in and out channels are equal (TRADES ``equalInOut``)
      y   = convShortcut(a) + out   otherwise (1x1 conv with the stride, no bias), applied to the
                                    **activated** input ``a``, as TRADES's ``forward`` does

- final BN-ReLU, global average pooling (TRADES's ``avg_pool2d(out, 8)`` on the 8x8 map of a 32-px
  input), linear head ``fc`` (with bias);
- dropout (``drop_rate``, TRADES's ``dropRate``, 0 in its training script) only in training mode.

No input normalisation by default (``norm='none'``): TRADES trains on images in [0, 1] with no normaliser.
BatchNorm is PyTorch's (:class:`~advalign_jax.models.cifar_resnet.TorchBatchNorm`: epsilon 1e-5, momentum
0.1, unbiased running variance). Initialisation as TRADES: conv weights ``N(0, 2 / (k*k*out_channels))``,
BatchNorm scale 1 and bias 0, linear bias 0 (weight PyTorch's default).

Weight import (``"torch"``): TRADES's state-dict names ``conv1.weight``, ``block{g}.layer.{i}.bn1.*``,
``.conv1.weight``, ``.bn2.*``, ``.conv2.weight``, ``.convShortcut.weight``, ``bn1.*``, ``fc.weight`` /
``fc.bias``; depth, widen factor and classes are read off the checkpoint. TRADES's model also registers a
``sub_block1`` that its ``forward`` never uses: its tensors are in every TRADES checkpoint and are
ignored. DataParallel's ``module.`` prefix is dropped.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from advalign_jax.errors import AdvalignError
from advalign_jax.models import importers
from advalign_jax.models.base import (InputNorm, ModelDef, Normalize, compute_dtype, last_relu, maybe_remat,
                                      stat_dtype, torch_pad)
from advalign_jax.models.cifar_resnet import TorchBatchNorm, torch_kernel_init

# TRADES's conv initialisation: normal(0, sqrt(2 / n)) with n = kh * kw * out_channels (fan-out).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=torch_pad(kernel),
                   use_bias=False, dtype=dtype, kernel_init=conv_init, name=name)


class WideBasicBlock(nn.Module):
    """TRADES's pre-activation BasicBlock (see the module docstring for the formula)."""

    features: int
    stride: int = 1
    drop_rate: float = 0.0
    dtype: str = "float32"
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        bn = functools.partial(TorchBatchNorm, use_running_average=not train, dtype=dtype,
                               axis_name=self.bn_axis_name)
        equal = x.shape[-1] == self.features
        if equal and self.stride != 1:
            raise ValueError("a WideResNet block with equal in/out channels has stride 1 (as in TRADES)")
        a = nn.relu(bn(name="bn1")(x))
        out = nn.relu(bn(name="bn2")(_conv(self.features, 3, self.stride, dtype, "conv1")(a)))
        if self.drop_rate > 0:
            out = nn.Dropout(self.drop_rate, deterministic=not train)(out)
        out = _conv(self.features, 3, 1, dtype, "conv2")(out)
        shortcut = x if equal else _conv(self.features, 1, self.stride, dtype, "conv_shortcut")(a)
        return shortcut + out


class WideResNet(nn.Module):
    """WRN-depth-widen_factor in TRADES's layout."""

    num_classes: int = 10
    depth: int = 34
    widen_factor: int = 10
    drop_rate: float = 0.0
    norm: InputNorm = InputNorm()
    dtype: str = "float32"
    remat: bool = False
    bn_axis_name: Optional[str] = None
    fake_relu: bool = False  # the last ReLU (after the final bn1) backward as the identity: base.fake_relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = blocks_per_group(self.depth)
        dtype = compute_dtype(self.dtype)
        x = Normalize(self.norm)(x).astype(dtype)
        x = _conv(16, 3, 1, dtype, "conv1")(x)
        self.sow("intermediates", "stem_out", x)
        block = maybe_remat(WideBasicBlock, self.remat)
        for g, (width, stride) in enumerate(zip(widths(self.widen_factor), (1, 2, 2))):
            for i in range(n):
                x = block(width, stride if i == 0 else 1, self.drop_rate, dtype=self.dtype,
                          bn_axis_name=self.bn_axis_name, name=f"block{g + 1}_{i}")(x, train)
            self.sow("intermediates", f"block{g + 1}_out", x)
        x = TorchBatchNorm(use_running_average=not train, dtype=dtype, axis_name=self.bn_axis_name, name="bn1")(x)
        x = last_relu(x, self.fake_relu)
        x = jnp.mean(x.astype(stat_dtype(x)), axis=(1, 2)).astype(dtype)
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return nn.Dense(self.num_classes, dtype=dtype, kernel_init=torch_kernel_init, bias_init=nn.initializers.zeros,
                        name="fc")(x)


def blocks_per_group(depth: int) -> int:
    """``n`` of WRN-depth: ``depth = 6 n + 4``."""
    if depth < 10 or (depth - 4) % 6:
        raise AdvalignError(f"WideResNet depth must be 6 n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
    return (depth - 4) // 6


def widths(widen_factor: int) -> tuple:
    if widen_factor < 1:
        raise AdvalignError(f"WideResNet widen_factor must be a positive integer, got {widen_factor}")
    return (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)


def build(depth: int = 34, widen_factor: int = 10, **options) -> WideResNet:
    """The flax module, with depth and widen factor checked."""
    blocks_per_group(int(depth))
    widths(int(widen_factor))
    return WideResNet(depth=int(depth), widen_factor=int(widen_factor), **options)


# ----------------------------------------------------------------------------------------------------
# Import of TRADES's PyTorch state dict
# ----------------------------------------------------------------------------------------------------

def torch_rules(model) -> list:
    """TRADES WideResNet state-dict names -> our variables."""
    module = model.module
    rules = importers.torch_conv("conv1", "conv1")
    channels = 16
    for g, width in enumerate(widths(module.widen_factor)):
        for i in range(blocks_per_group(module.depth)):
            ours, theirs = f"block{g + 1}_{i}", f"block{g + 1}.layer.{i}"
            rules += importers.torch_bn(f"{ours}/bn1", f"{theirs}.bn1")
            rules += importers.torch_conv(f"{ours}/conv1", f"{theirs}.conv1")
            rules += importers.torch_bn(f"{ours}/bn2", f"{theirs}.bn2")
            rules += importers.torch_conv(f"{ours}/conv2", f"{theirs}.conv2")
            if channels != width:
                rules += importers.torch_conv(f"{ours}/conv_shortcut", f"{theirs}.convShortcut")
            channels = width
    return rules + importers.torch_bn("bn1", "bn1") + importers.torch_dense("fc", "fc")


def torch_infer(weights) -> dict:
    """num_classes from ``fc``; depth from the blocks of ``block1``; widen factor from its width."""
    weights = _drop_module_prefix(weights)
    options = {}
    num_classes = importers.infer_num_classes(weights, "fc", "torch")
    if num_classes is not None:
        options["num_classes"] = num_classes
    n = 0
    while f"block1.layer.{n}.conv1.weight" in weights:
        n += 1
    if n:
        options["depth"] = 6 * n + 4
        width = int(np.shape(weights["block1.layer.0.conv1.weight"])[0])
        if width % 16 == 0:
            options["widen_factor"] = width // 16
    return options


def _drop_module_prefix(weights) -> dict:
    """The names without DataParallel's ``module.`` prefix (files read by :mod:`~advalign_jax.models.readers`
    have it dropped already; this covers weights passed in memory)."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}


TORCH = importers.Importer(rules=torch_rules, infer=torch_infer, ignore=("num_batches_tracked", "sub_block1."),
                           norm="none", rename=_drop_module_prefix,
                           description="TRADES WideResNet state dict (yaodongyu/TRADES models/wideresnet.py)")


def _def(name: str, depth: int, widen_factor: int) -> ModelDef:
    return ModelDef(
        name=name, build=build,
        options=dict(num_classes=10, input_size=32, norm="none", depth=depth, widen_factor=widen_factor,
                     drop_rate=0.0, dtype="float32", remat=False, bn_axis_name=None),
        description=f"WideResNet-{depth}-{widen_factor} of TRADES (pre-activation BasicBlocks, 32 px, no "
                    "input normalisation)",
        importers={"torch": TORCH})


MODELS = {
    "wrn34_10": _def("wrn34_10", 34, 10),
    "wrn28_10": _def("wrn28_10", 28, 10),
}
