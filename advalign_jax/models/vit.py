"""Vision Transformers: ViT-B/16, ViT-S/16 and ViT-Ti/16 (timm ``vit_*_patch16_224`` and the vit_keras
ViT-B/16 of the harmonized release).

==========  =====  =====  =====  =========
name        width  depth  heads  MLP width
==========  =====  =====  =====  =========
vit_b16     768    12     12     3072
vit_s16     384    12     6      1536
vit_ti16    192    12     3      768
==========  =====  =====  =====  =========

Architecture (the same in timm ``VisionTransformer`` and vit_keras): a 16x16 stride-16 'valid' conv with
bias (patch embedding), patches flattened row-major, a learned class token prepended, learned position
embeddings added (one per token, class token included), ``depth`` pre-LN blocks
``x += attn(LN(x)); x += MLP(LN(x))`` with LayerNorm epsilon 1e-6, multi-head self-attention
``softmax(q k^T / sqrt(head_dim)) v`` with biased q/k/v/out projections, an MLP ``Dense(4w) - GELU (exact,
erf) - Dense(w)``, a final LayerNorm, and a linear head on the class token. No dropout or stochastic
depth (both are 0 in timm's defaults and only active in training).

Input size: the position-embedding grid is fixed by ``input_size`` (``(input_size / 16)**2 + 1``
embeddings; 224 -> 197). Importers read it off the checkpoint's position embedding, so a checkpoint made
at 384 px builds a 384-px model; a model applied to another size raises an error (no resampling).
``pool`` selects the classifier input: ``"token"`` (the final LayerNorm of the class token, timm's and
vit_keras's default) or ``"avg"`` (timm's ``global_pool='avg'``: the mean of the patch tokens, class token
excluded, then the final LayerNorm, which timm calls ``fc_norm`` in that configuration).

Flax parameter tree: ``patch_embed``, ``cls_token`` (1, 1, w), ``pos_embed`` (1, tokens, w),
``block{i}/{norm1, attn/{query,key,value,out}, norm2, fc1, fc2}``, ``norm``, ``head``.
Intermediates: ``embed_out`` (tokens after the position embedding) and ``block{i}_out``.

Importers:

- ``torch``: timm state dicts (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv`` (one fused (3w, w) projection, split here into
  query/key/value in that order), ``blocks.{i}.attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``,
  ``norm`` (``fc_norm`` with ``global_pool='avg'``, read off the checkpoint), ``head``). Default input
  normalisation ``half`` (mean 0.5, std 0.5): the pretrained config of timm 1.0's
  ``vit_base_patch16_224`` / ``vit_small_patch16_224`` / ``vit_tiny_patch16_224`` (the augreg weights,
  and the original Google weights before them). DeiT checkpoints, which share these
  names, were trained on ImageNet statistics: convert them with ``--norm imagenet``.
- ``keras``: the vit_keras layout (faustomorales/vit-keras), as in the harmonized ViT-B/16 ``.h5``:
  ``embedding`` (Conv2D kernel (16, 16, 3, w)), ``class_token/cls`` (1, 1, w),
  ``Transformer/posembed_input/pos_embedding`` (1, tokens, w), ``Transformer/encoderblock_{i}`` holding
  ``LayerNorm_0``, ``MultiHeadDotProductAttention_1/{query,key,value,out}`` (Dense kernels (w, w)),
  ``LayerNorm_2`` and ``MlpBlock_3/Dense_{0,1}``, ``Transformer/encoder_norm``, ``head``. The names of
  the MLP Dense layers differ between Keras versions (Keras 2 writes ``Transformer/encoderblock_0/
  Dense_0/kernel``, vit_keras 0.2 under Keras 3 writes ``Transformer_encoderblock_0/MlpBlock_3/
  Transformer_encoderblock_0_Dense_0/kernel`` and ``_`` for ``/`` in layer names); the importer's
  ``rename`` maps all of them onto the names above. Default normalisation ``imagenet`` (the harmonized
  training's ``(x/255 - mean)/std``). The head is imported as logits; a ``pre_logits`` layer
  (vit_keras's ``representation_size``) is not supported and is reported as unexpected. Checked
  against vit_keras 0.1.2 saved by tf_keras 2.21 and vit_keras 0.2.0 saved by Keras 3.15, as ``.h5``:
  a ``.keras`` archive of a vit_keras model cannot be used, because the archive reader names weights
  by layer and bare weight name and the blocks' nested query/key/value kernels would collide.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.models.base import InputNorm, ModelDef, Normalize, compute_dtype, maybe_remat
from advalign_jax.models.importers import (Importer, Rule, infer_num_classes, keras_conv, keras_dense, keras_ln,
                                           torch_conv, torch_dense, torch_ln)

LN_EPS = 1e-6


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch and Keras compute it.
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate biased query/key/value/out projections (w -> w)."""

    heads: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        dtype = compute_dtype(self.dtype)
        n, t, width = x.shape
        if width % self.heads:
            raise ValueError(f"width {width} is not divisible by {self.heads} heads")
        head_dim = width // self.heads

        def project(name):
            return nn.Dense(width, dtype=dtype, name=name)(x).reshape(n, t, self.heads, head_dim)

        q, k, v = project("query"), project("key"), project("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.asarray(math.sqrt(head_dim), dtype)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(n, t, width)
        return nn.Dense(width, dtype=dtype, name="out")(out)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    heads: int
    mlp_dim: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = compute_dtype(self.dtype)
        y = _layer_norm("norm1", dtype)(x)
        x = x + SelfAttention(self.heads, dtype=self.dtype, name="attn")(y)
        y = _layer_norm("norm2", dtype)(x)
        y = nn.Dense(self.mlp_dim, dtype=dtype, name="fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(x.shape[-1], dtype=dtype, name="fc2")(y)
        return x + y


class ViT(nn.Module):
    num_classes: int = 1000
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pool: str = "token"
    norm: InputNorm = InputNorm()
    dtype: str = "float32"
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {self.pool!r}")
        dtype = compute_dtype(self.dtype)
        x = Normalize(self.norm)(x).astype(dtype)
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="patch_embed")(x)
        n, gh, gw, _ = x.shape
        x = x.reshape(n, gh * gw, self.width)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (n, 1, self.width)), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, gh * gw + 1, self.width), jnp.float32)
        if pos.shape[1] != x.shape[1]:
            side = math.isqrt(pos.shape[1] - 1) * p
            raise ValueError(f"this ViT's position embeddings are for {side}x{side} inputs "
                             f"({pos.shape[1]} tokens); got {gh * p}x{gw * p} ({x.shape[1]} tokens)")
        x = x + pos.astype(dtype)
        self.sow("intermediates", "embed_out", x)
        block = maybe_remat(EncoderBlock, self.remat)
        for i in range(self.depth):
            x = block(self.heads, self.mlp_dim, dtype=self.dtype, name=f"block{i}")(x, train)
            self.sow("intermediates", f"block{i}_out", x)
        if self.pool == "token":
            x = _layer_norm("norm", dtype)(x)[:, 0]
        else:
            x = _layer_norm("norm", dtype)(jnp.mean(x[:, 1:], axis=1))
        self.sow("intermediates", "features", x)  # the penultimate features: the head's input
        return nn.Dense(self.num_classes, dtype=dtype, name="head")(x)


# ----------------------------------------------------------------------------------------------------
# Importers
# ----------------------------------------------------------------------------------------------------

def _qkv_part(index: int):
    """timm's fused qkv weight (3w, w) / bias (3w,) -> the query (0), key (1) or value (2) part, flax layout."""
    def take(w):
        part = np.split(np.asarray(w), 3, axis=0)[index]
        return part.T if part.ndim == 2 else part
    return take


def torch_rules(model) -> list:
    rules = torch_conv("patch_embed", "patch_embed.proj", bias=True)
    rules += [Rule("params/cls_token", "cls_token"), Rule("params/pos_embed", "pos_embed")]
    for i in range(model.module.depth):
        src, dst = f"blocks.{i}", f"block{i}"
        rules += torch_ln(f"{dst}/norm1", f"{src}.norm1")
        for j, part in enumerate(("query", "key", "value")):
            rules += [Rule(f"params/{dst}/attn/{part}/kernel", f"{src}.attn.qkv.weight", _qkv_part(j)),
                      Rule(f"params/{dst}/attn/{part}/bias", f"{src}.attn.qkv.bias", _qkv_part(j))]
        rules += torch_dense(f"{dst}/attn/out", f"{src}.attn.proj")
        rules += torch_ln(f"{dst}/norm2", f"{src}.norm2")
        rules += torch_dense(f"{dst}/fc1", f"{src}.mlp.fc1")
        rules += torch_dense(f"{dst}/fc2", f"{src}.mlp.fc2")
    rules += torch_ln("norm", "fc_norm" if model.module.pool == "avg" else "norm")
    return rules + torch_dense("head", "head")


def keras_rules(model) -> list:
    """The vit_keras table, on the canonical names :func:`keras_rename` produces."""
    rules = keras_conv("patch_embed", "embedding")
    rules += [Rule("params/cls_token", "class_token/cls"),
              Rule("params/pos_embed", "Transformer/posembed_input/pos_embedding")]
    for i in range(model.module.depth):
        src, dst = f"Transformer/encoderblock_{i}", f"block{i}"
        rules += keras_ln(f"{dst}/norm1", f"{src}/LayerNorm_0")
        for part in ("query", "key", "value", "out"):
            rules += keras_dense(f"{dst}/attn/{part}", f"{src}/MultiHeadDotProductAttention_1/{part}")
        rules += keras_ln(f"{dst}/norm2", f"{src}/LayerNorm_2")
        rules += keras_dense(f"{dst}/fc1", f"{src}/MlpBlock_3/Dense_0")
        rules += keras_dense(f"{dst}/fc2", f"{src}/MlpBlock_3/Dense_1")
    rules += keras_ln("norm", "Transformer/encoder_norm") + keras_dense("head", "head")
    return rules


_KERAS3_LAYER = re.compile(r"^Transformer_(posembed_input|encoder_norm|encoderblock_\d+)/")
# The MLP Dense layers of block i, wherever Keras put them: 'Transformer/encoderblock_0/Dense_0/kernel'
# (tf.keras 2), '.../MlpBlock_3/Transformer_encoderblock_0_Dense_0/kernel' (vit_keras 0.2, Keras 3),
# '.../MlpBlock_3/Transformer/encoderblock_0/Dense_0/kernel' (nested name scopes).
_KERAS_MLP = re.compile(r"^(Transformer/encoderblock_\d+)/(?:.*/)?(?:[^/]*_)?(Dense_[01])/(kernel|bias)$")


def keras_rename(weights: Mapping) -> dict:
    """vit_keras names of any Keras version -> the canonical names of :func:`keras_rules`."""
    out = {}
    for name, value in weights.items():
        canonical = _KERAS3_LAYER.sub(r"Transformer/\1/", name)
        canonical = _KERAS_MLP.sub(r"\1/MlpBlock_3/\2/\3", canonical)
        out[canonical if canonical not in out else name] = value
    return out


def _input_size(pos_embed, patch_size: int) -> dict:
    """input_size from a (1, 1 + grid**2, w) position embedding, if it is square."""
    if pos_embed is None or np.ndim(pos_embed) != 3:
        return {}
    side = math.isqrt(max(int(pos_embed.shape[1]) - 1, 0))
    return {"input_size": side * patch_size} if side > 0 and side * side == pos_embed.shape[1] - 1 else {}


def torch_infer(weights: Mapping) -> dict:
    options = {}
    n = infer_num_classes(weights, "head", "torch")
    if n is not None:
        options["num_classes"] = n
    patch = weights.get("patch_embed.proj.weight")
    if patch is not None and np.ndim(patch) == 4:
        options.update(_input_size(weights.get("pos_embed"), int(patch.shape[-1])))
    if "fc_norm.weight" in weights and "norm.weight" not in weights:
        options["pool"] = "avg"  # timm global_pool='avg'
    return options


def keras_infer(weights: Mapping) -> dict:
    weights = keras_rename(weights)
    options = {}
    n = infer_num_classes(weights, "head", "keras")
    if n is not None:
        options["num_classes"] = n
    kernel = weights.get("embedding/kernel")
    if kernel is not None and np.ndim(kernel) == 4:
        options.update(_input_size(weights.get("Transformer/posembed_input/pos_embedding"), int(kernel.shape[0])))
    return options


TORCH = Importer(rules=torch_rules, infer=torch_infer, norm="half",
                 description="timm VisionTransformer state dict (vit_*_patch16_*)")
KERAS = Importer(rules=keras_rules, infer=keras_infer, norm="imagenet", rename=keras_rename,
                 description="vit_keras model (.h5), e.g. the harmonized ViT-B/16")

_VARIANTS = {
    "vit_b16": (768, 12, 12, "ViT-B/16"),
    "vit_s16": (384, 12, 6, "ViT-S/16"),
    "vit_ti16": (192, 12, 3, "ViT-Ti/16"),
}

MODELS = {
    name: ModelDef(
        name=name, build=ViT,
        options=dict(num_classes=1000, input_size=224, patch_size=16, width=width, depth=depth, heads=heads,
                     mlp_dim=4 * width, pool="token", norm="half", dtype="float32", remat=False),
        description=f"{label} Vision Transformer (timm vit_*_patch16_224; vit_keras layout)",
        importers={"torch": TORCH, "keras": KERAS})
    for name, (width, depth, heads, label) in _VARIANTS.items()
}
