"""Keras references for the vit_keras layout, and a writer for Keras 2 ``.h5`` files.

The harmonized ViT-B/16 is a vit_keras (faustomorales/vit-keras 0.1) model saved by tf.keras 2, whose
layer names contain ``/`` (``Transformer/encoderblock_0``), which Keras 3 refuses. So the test builds the
same network in Keras 3 from vit_keras's documented architecture (written here, not copied: Conv2D
``embedding`` 16x16/16 'valid', row-major reshape, class token prepended, learned position embeddings,
pre-LN blocks with LayerNorm eps 1e-6, attention ``softmax(q k^T / sqrt(head_dim)) v`` with Dense
query/key/value/out (w -> w), MLP Dense - GELU(exact) - Dense, final LayerNorm, Dense head on token 0),
and writes its weights under the names tf.keras 2 gives them (checked against vit_keras 0.1.2 saved by
tf_keras 2.21): layer groups ``embedding``, ``class_token``, ``Transformer/posembed_input``,
``Transformer/encoderblock_{i}``, ``Transformer/encoder_norm``, ``head``; weights such as
``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel:0`` and
``Transformer/encoderblock_0/Dense_0/kernel:0``.
"""

import h5py
import numpy as np


def write_keras2_h5(path, groups):
    """A Keras 2 legacy weights layout: ``model_weights`` with ``layer_names``, one group per layer with
    ``weight_names``, datasets at those (``/``-nested) names, as tf.keras 2's ``model.save('x.h5')``."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = np.array([name.encode() for name, _ in groups])
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.9.0"
        for layer, weights in groups:
            g = root.create_group(layer)
            g.attrs["weight_names"] = np.array([w.encode() for w, _ in weights], dtype="S")
            for w, value in weights:
                g.create_dataset(w, data=np.asarray(value, np.float32))


def build_reference(keras, image_size, patch, depth, width, heads, mlp_dim, classes):
    """A Keras 3 functional ViT with vit_keras's architecture; layer names are ours (no ``/``)."""
    ops, layers = keras.ops, keras.layers

    class ClassToken(layers.Layer):
        def build(self, shape):
            self.cls = self.add_weight(shape=(1, 1, shape[-1]), initializer="zeros", name="cls")

        def call(self, x):
            return ops.concatenate([ops.broadcast_to(self.cls, (ops.shape(x)[0], 1, x.shape[-1])), x], axis=1)

    class PositionEmbedding(layers.Layer):
        def build(self, shape):
            self.pe = self.add_weight(shape=(1, shape[1], shape[2]), initializer="random_normal", name="pos_embedding")

        def call(self, x):
            return x + self.pe

    class SelfAttention(layers.Layer):
        def __init__(self, heads, **kwargs):
            super().__init__(**kwargs)
            self.heads = heads

        def build(self, shape):
            w = shape[-1]
            self.dense = {k: layers.Dense(w, name=k) for k in ("query", "key", "value", "out")}
            for k in ("query", "key", "value"):
                self.dense[k].build(shape)
            self.dense["out"].build(shape)

        def call(self, x):
            n, t, w = ops.shape(x)[0], x.shape[1], x.shape[2]
            hd = w // self.heads

            def split(y):
                return ops.transpose(ops.reshape(y, (n, t, self.heads, hd)), (0, 2, 1, 3))

            q, k, v = (split(self.dense[name](x)) for name in ("query", "key", "value"))
            scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / np.float32(np.sqrt(hd))
            out = ops.matmul(ops.softmax(scores, axis=-1), v)
            return self.dense["out"](ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (n, t, w)))

    inp = keras.Input((image_size, image_size, 3))
    y = layers.Conv2D(width, patch, strides=patch, padding="valid", name="embedding")(inp)
    y = layers.Reshape((-1, width))(y)
    y = ClassToken(name="class_token")(y)
    y = PositionEmbedding(name="posembed_input")(y)
    blocks = [y]
    for i in range(depth):
        pre = f"encoderblock_{i}"
        h = layers.LayerNormalization(epsilon=1e-6, name=f"{pre}_LayerNorm_0")(y)
        y = layers.Add()([y, SelfAttention(heads, name=f"{pre}_attention")(h)])
        h = layers.LayerNormalization(epsilon=1e-6, name=f"{pre}_LayerNorm_2")(y)
        h = layers.Dense(mlp_dim, name=f"{pre}_Dense_0")(h)
        h = layers.Activation(lambda z: keras.activations.gelu(z, approximate=False))(h)
        y = layers.Add()([y, layers.Dense(width, name=f"{pre}_Dense_1")(h)])
        blocks.append(y)
    y = layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")(y)
    y = layers.Lambda(lambda v: v[:, 0])(y)
    logits = layers.Dense(classes, name="head")(y)
    return keras.Model(inp, logits), keras.Model(inp, blocks)


def randomize(model, seed):
    rng = np.random.default_rng(seed)
    for w in model.weights:
        name, shape = w.path, tuple(w.shape)
        if name.endswith("gamma"):
            w.assign(1.0 + 0.2 * rng.standard_normal(shape).astype(np.float32))
        elif name.endswith(("beta", "bias", "cls", "pos_embedding")):
            w.assign(0.1 * rng.standard_normal(shape).astype(np.float32))


def vit_keras_groups(model, depth):
    """The reference's weights under tf.keras 2's vit_keras names (layer group, [(weight name, array)])."""
    def get(layer, *attrs):
        return [np.asarray(getattr(model.get_layer(layer), a).numpy()) for a in attrs]

    def ln(layer, target):
        gamma, beta = get(layer, "gamma", "beta")
        return [(f"{target}/gamma:0", gamma), (f"{target}/beta:0", beta)]

    def dense(layer, target):
        kernel, bias = get(layer, "kernel", "bias") if isinstance(layer, str) else (layer.kernel, layer.bias)
        return [(f"{target}/kernel:0", np.asarray(kernel)), (f"{target}/bias:0", np.asarray(bias))]

    groups = [("embedding", dense("embedding", "embedding")),
              ("class_token", [("class_token/cls:0", get("class_token", "cls")[0])]),
              ("Transformer/posembed_input",
               [("Transformer/posembed_input/pos_embedding:0", get("posembed_input", "pe")[0])])]
    for i in range(depth):
        pre, g = f"encoderblock_{i}", f"Transformer/encoderblock_{i}"
        att = model.get_layer(f"{pre}_attention")
        weights = []
        for k in ("query", "key", "value", "out"):
            weights += dense(att.dense[k], f"{g}/MultiHeadDotProductAttention_1/{k}")
        weights += dense(f"{pre}_Dense_0", f"{g}/Dense_0") + dense(f"{pre}_Dense_1", f"{g}/Dense_1")
        weights += ln(f"{pre}_LayerNorm_0", f"{g}/LayerNorm_0") + ln(f"{pre}_LayerNorm_2", f"{g}/LayerNorm_2")
        groups.append((g, weights))
    groups.append(("Transformer/encoder_norm", ln("encoder_norm", "Transformer/encoder_norm")))
    groups.append(("head", dense("head", "head")))
    return groups
