"""Model throughput: forward and forward+backward images/s, ours vs the same model in Keras.

    python benchmarks/models_throughput.py [--batch 32] [--size 224] [--repeats 3] [--archs ...]
                                           [--dtype float32|bfloat16]

For each ImageNet architecture, in one run on the same machine: our Flax model compiled with
``jax.jit`` and, where Keras provides the architecture offline, the Keras model (random weights) in
a ``tf.function``. "forward" is inference-mode logits; "forward+backward" is the gradient of the mean
cross-entropy w.r.t. all parameters (training mode where the model has BatchNorm). The table gives
images/s (best of ``repeats`` after a warm-up call) and the ratio ours / Keras.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.models import get_model
from timing import best_time  # benchmarks/timing.py

# ours -> keras.applications constructor (None: no Keras equivalent)
ARCHS = {
    "resnet50_keras": "ResNet50",
    "resnet50v2": "ResNet50V2",
    "vgg16": "VGG16",
    "efficientnet_b0": "EfficientNetB0",
    "convnext_tiny": "ConvNeXtTiny",
    "resnet50": None,
    "vit_b16": None,
}


def best_rate(fn, batch, repeats):
    return batch / best_time(fn, repeats)


def ours(arch, batch, size, repeats, dtype):
    model = get_model(arch, dtype=dtype)
    variables = model.init(jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 3)).astype(np.float32))
    fwd = jax.jit(model.apply)

    def loss(params, state):
        logits, _ = model.apply_train({"params": params, **state}, x)
        return jnp.mean(-jax.nn.log_softmax(logits)[:, 0])

    state = {k: v for k, v in variables.items() if k != "params"}
    grad = jax.jit(jax.grad(loss))
    f = best_rate(lambda: fwd(variables, x).block_until_ready(), batch, repeats)
    b = best_rate(lambda: jax.block_until_ready(grad(variables["params"], state)), batch, repeats)
    return f, b


def keras_rates(name, batch, size, repeats):
    from advalign_jax.data.tf_env import import_tf  # pylint: disable=import-outside-toplevel

    tf = import_tf()
    import keras  # pylint: disable=import-outside-toplevel

    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, size=(batch, size, size, 3)).astype(np.float32))
    y = tf.zeros((batch,), tf.int32)
    fwd = tf.function(lambda: model(x, training=False), jit_compile=False)

    @tf.function
    def grad():
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        return tape.gradient(loss, model.trainable_variables)

    f = best_rate(lambda: fwd().numpy(), batch, repeats)
    b = best_rate(lambda: [g.numpy() for g in grad()], batch, repeats)
    return f, b


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--no-keras", action="store_true")
    args = parser.parse_args()
    rows = []
    for arch in args.archs:
        f, b = ours(arch, args.batch, args.size, args.repeats, args.dtype)
        kf = kb = float("nan")
        if ARCHS.get(arch) and not args.no_keras:
            kf, kb = keras_rates(ARCHS[arch], args.batch, args.size, args.repeats)
        rows.append((arch, f, kf, b, kb))
        print(f"{arch}: done", file=sys.stderr)
    print(f"images/s at batch {args.batch}, {args.size} px, {args.dtype}, best of {args.repeats}, "
          f"{jax.devices()[0].platform} ({os.cpu_count()} CPU cores)")
    print("| model | forward: ours | forward: Keras | ratio | fwd+bwd: ours | fwd+bwd: Keras | ratio |")
    print("|---|---|---|---|---|---|---|")
    for arch, f, kf, b, kb in rows:
        print(f"| {arch} | {f:.1f} | {kf:.1f} | {f / kf:.2f} | {b:.1f} | {kb:.1f} | {b / kb:.2f} |")


if __name__ == "__main__":
    main()
