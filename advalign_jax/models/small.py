"""Small models: the 2-layer MLP of the toy experiments and the small CNN of the embedded demonstration.

- ``mlp2``: ``Linear(in, hidden) - ReLU - Linear(hidden, classes)``, the PAG toy model
  (Ganz, Kawar, Elad, "Do Perceptually Aligned Gradients Imply Robustness?", ICML 2023, its 2-D
  experiment: 2 -> 32 -> 2, no input scaling).
- ``small_cnn``: a 4-stage CNN for 224x224 ClickMe-style images, cheap enough for a CPU (about 15 M
  multiply-adds per image): a ``patch x patch`` stride-``patch`` stem (8: 224 -> 28), three 3x3 conv +
  BatchNorm + ReLU stages with 2x2 max-pooling between them, global average pooling and a linear
  head; ImageNet input normalisation inside.
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


def torch_linear_init(fan_in: int):
    """PyTorch's default ``nn.Linear`` initialisation: weights and biases uniform in
    ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (kaiming_uniform with a = sqrt(5))."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class MLP(nn.Module):
    num_classes: int = 2
    hidden: int = 32
    norm: InputNorm = InputNorm()
    init_scheme: str = "torch"  # 'torch' (PyTorch's nn.Linear default, as the PAG toy code) or 'lecun' (flax's)
    dtype: str = "float32"
    remat: bool = False
    flatten: bool = False  # flatten each input (e.g. an image) to one vector first
    fake_relu: bool = False  # fc1's ReLU (the features') backward as the identity: base.fake_relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        x = x.astype(dtype)
        if self.flatten:
            x = x.reshape(x.shape[0], -1)

        def dense(features, fan_in, name):
            if self.init_scheme == "torch":
                return nn.Dense(features, dtype=dtype, name=name, kernel_init=torch_linear_init(fan_in),
                                bias_init=torch_linear_init(fan_in))
            return nn.Dense(features, dtype=dtype, name=name)

        x = last_relu(dense(self.hidden, x.shape[-1], "fc1")(x), self.fake_relu)
        self.sow("intermediates", "hidden_out", x)
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return dense(self.num_classes, self.hidden, "fc2")(x)


class ConvStage(nn.Module):
    features: int
    pool: bool
    dtype: str = "float32"
    fake_relu: bool = False  # the last stage's ReLU as base.fake_relu (identity backward)

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                    name="conv")(x)
        x = last_relu(batch_norm(train, "bn", dtype=dtype)(x), self.fake_relu)
        return nn.max_pool(x, (2, 2), (2, 2)) if self.pool else x


class PatchStem(nn.Module):
    """A ``patch x patch`` convolution with stride ``patch`` (no overlap), computed as a reshape and one
    matrix product: the same function and parameters (``kernel`` (p, p, C, F), ``bias``) as
    ``nn.Conv(F, (p, p), strides=(p, p), padding='VALID')``, several times faster on CPU. Inputs whose
    sides are not multiples of ``patch`` are cropped at the bottom/right, as VALID padding does."""

    features: int
    patch: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        p = self.patch
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        dtype = compute_dtype(self.dtype)
        x = x[:, :h // p * p, :w // p * p].astype(dtype)
        x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // p, w // p, p * p * c)
        return x @ kernel.reshape(p * p * c, self.features).astype(dtype) + bias.astype(dtype)


class SmallCNN(nn.Module):
    num_classes: int = 10
    widths: Sequence[int] = (24, 32, 64, 96)
    patch: int = 8
    norm: InputNorm = InputNorm()
    dtype: str = "float32"
    remat: bool = False
    fake_relu: bool = False  # the last ReLU (the last stage's) backward as the identity: base.fake_relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        x = Normalize(self.norm)(x).astype(dtype)
        x = PatchStem(self.widths[0], self.patch, dtype=self.dtype, name="stem")(x)
        x = nn.relu(x)
        self.sow("intermediates", "stem_out", x)
        stage = maybe_remat(ConvStage, self.remat)
        for i, width in enumerate(self.widths[1:]):
            last = i == len(self.widths) - 2
            x = stage(width, pool=not last, dtype=self.dtype, fake_relu=self.fake_relu and last,
                      name=f"stage{i + 1}")(x, train)
            self.sow("intermediates", f"stage{i + 1}_out", x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return nn.Dense(self.num_classes, dtype=dtype, name="head")(x)


MODELS = {
    "mlp2": ModelDef(
        name="mlp2", build=MLP,
        options=dict(num_classes=2, hidden=32, input_shape=(2,), norm="none", init_scheme="torch", dtype="float32",
                     remat=False),
        description="2-layer MLP (the PAG toy experiment: 2 -> 32 -> 2)"),
    "mlp": ModelDef(
        name="mlp", build=functools.partial(MLP, flatten=True),
        options=dict(num_classes=10, hidden=256, input_shape=(16, 16, 3), norm="none", init_scheme="lecun",
                     dtype="float32", remat=False),
        description="2-layer MLP on flattened images (Linear(H*W*C, hidden) - ReLU - Linear(hidden, classes))"),
    "small_cnn": ModelDef(
        name="small_cnn", build=SmallCNN,
        options=dict(num_classes=10, widths=(24, 32, 64, 96), patch=8, input_size=224, norm="imagenet",
                     dtype="float32", remat=False),
        description="small 4-stage CNN with BatchNorm for the embedded ClickMe demonstration"),
}
