"""The CIFAR ViT of PAG (Ganz, Kawar, Elad, "Do Perceptually Aligned Gradients Imply Robustness?", ICML 2023).

``cifar_vit`` matches ``models/ViT.py`` and ``models/vit_layers.py`` of the official PAG code
(royg27/PAG-ROB, which follows omihub777/ViT-CIFAR), built there as ``ViT()`` with its defaults:

- patches: 4x4 on 32x32 (the official ``patch=8`` counts patches per side), 64 tokens; each patch is
  flattened in (row, column, channel) order and embedded by a linear layer ``emb`` (48 -> 384);
- a learnable CLS token ``cls_token`` (1, 1, 384) in front and learnable position embeddings
  ``pos_emb`` (1, 65, 384) added; no dropout on the embeddings;
- 7 pre-LN encoder layers ``enc.{i}``: ``x + msa(la1(x))`` then ``x + mlp(la2(x))``, where ``mlp`` is
  ``Linear(384, 384) - GELU - Dropout - Linear(384, 384) - GELU - Dropout`` (GELU after **both**
  linears; exact erf GELU, PyTorch's ``nn.GELU()`` default);
- attention ``msa``: separate ``q``/``k``/``v`` linears with biases, 12 heads of 32, softmax over keys,
  heads concatenated and projected by ``o`` (with bias), then dropout;
- head ``fc``: LayerNorm then linear on the CLS token (the mean of the tokens when ``cls_token=False``).
  Every LayerNorm has PyTorch's epsilon 1e-5.

**The attention-scale quirk.** The official attention divides the scores by ``sqrt(384)``, the full
width (``self.sqrt_d = self.feats ** 0.5``), not by ``sqrt(head_dim) = sqrt(32)``: its softmax is
``sqrt(12)`` times "cooler" than a standard ViT's. ``attn_scale="width"`` (the default) keeps this for
parity with the official checkpoints and recipe; ``attn_scale="head_dim"`` gives the standard
``1/sqrt(head_dim)``.

Dropout (``dropout``, default 0.0 as in the official ``ViT()``) is applied in training mode only, where
the official code has it (after each MLP GELU and after ``o``), and needs a ``'dropout'`` rng
(``model.apply_train(..., rng=key)``) when positive.

Parameters are initialised as PyTorch does (linear layers ``kaiming_uniform(a=sqrt(5))``, uniform
biases; CLS token and position embeddings standard normal; LayerNorm scale 1, bias 0).

Weight import (``"torch"``): ``emb.{weight,bias}``, ``cls_token``, ``pos_emb``,
``enc.{i}.la1.*``, ``enc.{i}.msa.{q,k,v,o}.*``, ``enc.{i}.la2.*``, ``enc.{i}.mlp.0.*`` / ``mlp.3.*`` (the two
linears), ``fc.0.*`` (LayerNorm) and ``fc.1.*`` (head).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from advalign_jax.errors import AdvalignError
from advalign_jax.models import importers
from advalign_jax.models.base import InputNorm, ModelDef, Normalize, compute_dtype, maybe_remat
from advalign_jax.models.cifar_resnet import torch_dense

ATTN_SCALES = ("width", "head_dim")
LN_EPS = 1e-5  # torch.nn.LayerNorm's default


def attention_scale(attn_scale: str, hidden: int, heads: int) -> float:
    """The factor the attention scores are multiplied by: ``1/sqrt(hidden)`` for ``"width"`` (the
    official PAG code's quirk) or ``1/sqrt(hidden/heads)`` for ``"head_dim"`` (the standard ViT)."""
    if attn_scale == "width":
        return 1.0 / math.sqrt(hidden)
    if attn_scale == "head_dim":
        return 1.0 / math.sqrt(hidden // heads)
    raise AdvalignError(f"cifar_vit: attn_scale must be one of {', '.join(ATTN_SCALES)}, got {attn_scale!r}")


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o linears (official ``MultiHeadSelfAttention``)."""

    hidden: int
    heads: int
    attn_scale: str = "width"
    dropout: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        b, n, f = x.shape
        if self.hidden % self.heads:
            raise AdvalignError(f"cifar_vit: width {self.hidden} is not divisible by {self.heads} heads")
        split = lambda t: t.reshape(b, n, self.heads, self.hidden // self.heads)  # noqa: E731
        q = split(torch_dense(self.hidden, f, dtype, "q")(x))
        k = split(torch_dense(self.hidden, f, dtype, "k")(x))
        v = split(torch_dense(self.hidden, f, dtype, "v")(x))
        scores = jnp.einsum("bihd,bjhd->bhij", q, k) * attention_scale(self.attn_scale, self.hidden, self.heads)
        weights = nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
        out = jnp.einsum("bhij,bjhd->bihd", weights, v).reshape(b, n, self.hidden)
        out = torch_dense(self.hidden, self.hidden, dtype, "o")(out)
        return nn.Dropout(self.dropout, deterministic=not train)(out)


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer: ``x + msa(la1(x))``, then ``x + mlp(la2(x))`` with GELU after both MLP
    linears (official ``TransformerEncoder``)."""

    hidden: int
    mlp_hidden: int
    heads: int
    attn_scale: str = "width"
    dropout: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        x = x + SelfAttention(self.hidden, self.heads, self.attn_scale, self.dropout, self.dtype,
                              name="msa")(_layer_norm(dtype, "la1")(x), train)
        y = _layer_norm(dtype, "la2")(x)
        y = nn.gelu(torch_dense(self.mlp_hidden, self.hidden, dtype, "fc1")(y), approximate=False)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.gelu(torch_dense(self.hidden, self.mlp_hidden, dtype, "fc2")(y), approximate=False)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return x + y


def patchify(x, patch_size: int):
    """(N, H, W, C) -> (N, H/p * W/p, p * p * C): row-major patches, each flattened as (row, col, channel)
    (the order of the official ``_to_words``: ``unfold`` rows and columns, channels last)."""
    n, h, w, c = x.shape
    p = patch_size
    if h % p or w % p:
        raise AdvalignError(f"cifar_vit: a {h}x{w} input is not divisible into {p}x{p} patches")
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


class CifarViT(nn.Module):
    """PAG's CIFAR ViT (defaults: 4x4 patches, width 384, 7 layers, 12 heads, MLP 384, CLS token)."""

    num_classes: int = 10
    patch_size: int = 4
    hidden: int = 384
    num_layers: int = 7
    heads: int = 12
    mlp_hidden: int = 384
    cls_token: bool = True
    attn_scale: str = "width"
    dropout: float = 0.0
    norm: InputNorm = InputNorm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    dtype: str = "float32"
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        attention_scale(self.attn_scale, self.hidden, self.heads)  # validates the option
        x = Normalize(self.norm)(x).astype(dtype)
        tokens = patchify(x, self.patch_size)
        x = torch_dense(self.hidden, tokens.shape[-1], dtype, "emb")(tokens)
        if self.cls_token:
            cls = self.param("cls_token", nn.initializers.normal(1.0), (1, 1, self.hidden), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, self.hidden)), x], axis=1)
        pos = self.param("pos_emb", nn.initializers.normal(1.0), (1, x.shape[1], self.hidden), jnp.float32)
        x = x + pos.astype(dtype)
        self.sow("intermediates", "embed_out", x)
        layer = maybe_remat(EncoderLayer, self.remat)
        for i in range(self.num_layers):
            x = layer(self.hidden, self.mlp_hidden, self.heads, self.attn_scale, self.dropout, self.dtype,
                      name=f"enc_{i}")(x, train)
            self.sow("intermediates", f"enc{i}_out", x)
        x = x[:, 0] if self.cls_token else jnp.mean(x, axis=1)
        x = _layer_norm(dtype, "fc_norm")(x)
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return torch_dense(self.num_classes, self.hidden, dtype, "head")(x)


# ----------------------------------------------------------------------------------------------------
# Import of the official PyTorch state dict
# ----------------------------------------------------------------------------------------------------

def torch_rules(model) -> list:
    """Mapping table: official PAG ViT state-dict names -> our variables."""
    module = model.module
    rules = importers.torch_dense("emb", "emb")
    if module.cls_token:
        rules.append(importers.Rule("params/cls_token", "cls_token"))
    rules.append(importers.Rule("params/pos_emb", "pos_emb"))
    for i in range(module.num_layers):
        ours, theirs = f"enc_{i}", f"enc.{i}"
        rules += importers.torch_ln(f"{ours}/la1", f"{theirs}.la1")
        for proj in ("q", "k", "v", "o"):
            rules += importers.torch_dense(f"{ours}/msa/{proj}", f"{theirs}.msa.{proj}")
        rules += importers.torch_ln(f"{ours}/la2", f"{theirs}.la2")
        rules += importers.torch_dense(f"{ours}/fc1", f"{theirs}.mlp.0")
        rules += importers.torch_dense(f"{ours}/fc2", f"{theirs}.mlp.3")
    rules += importers.torch_ln("fc_norm", "fc.0") + importers.torch_dense("head", "fc.1")
    return rules


def torch_infer(weights) -> dict:
    """num_classes (``fc.1``), width and patch size (``emb``), CLS token, input size (``pos_emb``),
    layers (``enc.{i}``) and MLP width (``mlp.0``), as far as the checkpoint has them. The number of
    heads cannot be read off the weights (default 12)."""
    options = {}
    num_classes = importers.infer_num_classes(weights, "fc.1", "torch")
    if num_classes is not None:
        options["num_classes"] = num_classes
    emb = weights.get("emb.weight")
    if emb is None or np.ndim(emb) != 2:
        return options
    hidden, patch_len = (int(d) for d in np.shape(emb))
    patch = math.isqrt(patch_len // 3)
    if patch * patch * 3 != patch_len:
        return options
    options.update(hidden=hidden, patch_size=patch, cls_token="cls_token" in weights)
    if "pos_emb" in weights and np.ndim(weights["pos_emb"]) == 3:
        grid = math.isqrt(max(int(np.shape(weights["pos_emb"])[1]) - int(options["cls_token"]), 0))
        if grid > 0:
            options["input_size"] = grid * patch
    layers = 0
    while f"enc.{layers}.la1.weight" in weights:
        layers += 1
    if layers:
        options["num_layers"] = layers
    if "enc.0.mlp.0.weight" in weights:
        options["mlp_hidden"] = int(np.shape(weights["enc.0.mlp.0.weight"])[0])
    return options


MODELS = {
    "cifar_vit": ModelDef(
        name="cifar_vit", build=CifarViT,
        options=dict(num_classes=10, input_size=32, norm="half", patch_size=4, hidden=384, num_layers=7,
                     heads=12, mlp_hidden=384, cls_token=True, attn_scale="width", dropout=0.0,
                     dtype="float32", remat=False),
        description="CIFAR ViT of PAG (4x4 patches, width 384, 7 pre-LN layers, 12 heads, "
                    "attention scaled by 1/sqrt(width))",
        importers={"torch": importers.Importer(
            rules=torch_rules, infer=torch_infer, norm="half",
            description="official PAG ViT (omihub777/ViT-CIFAR naming) state dict")}),
}
