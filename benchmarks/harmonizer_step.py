"""The harmonizer's training step: its double-backprop overhead, and ours vs the reference TensorFlow loss.

    python benchmarks/harmonizer_step.py [--arch resnet50v2] [--batch 8] [--size 224] [--repeats 3]

On the same architecture (Keras ``ResNet50V2`` and our ``resnet50v2`` with the same random weights,
converted through the importer), the same batch, on the same machine in one run:

- ``CE step``: the gradient of label-smoothed cross-entropy w.r.t. the parameters (training mode);
- ``harmonizer step``: the gradient of the full harmonizer loss (CE + L2 + lambda x pyramidal
  alignment of the saliency from the same forward pass): double backprop;
- the reference: the harmonization package's ``harmonizer_loss`` (TensorFlow, GradientTape inside a
  ``tf.function``) on the Keras model, and a plain Keras CE step.

It prints step times, the overhead ratio (harmonizer / CE; goal at most 3x), the ratio ours /
reference, and XLA's peak temporary memory of our harmonizer step with and without
rematerialisation (``remat=True`` wraps every block in ``jax.checkpoint``).
"""

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from timing import best_time  # noqa: E402  (benchmarks/timing.py)

from advalign_jax.models import get_model  # noqa: E402
from advalign_jax.models.convert import convert  # noqa: E402
from advalign_jax.models.checkpoint import load_model  # noqa: E402
from advalign_jax.training.config_blocks import REFERENCE_DECAY_EXCLUDE  # noqa: E402
from advalign_jax.training.objectives import ce as ce_objective  # noqa: E402
from advalign_jax.training.objectives import harmonizer  # noqa: E402

KERAS = {"resnet50v2": "ResNet50V2", "vgg16": "VGG16", "efficientnet_b0": "EfficientNetB0",
         "convnext_tiny": "ConvNeXtTiny"}



def cfg():
    return ml_collections.ConfigDict(dict(lambda_harmonization=1.0, pyramid_levels=5, saliency="mean",
                                          label_smoothing=0.1, weight_decay=1e-5,
                                          decay_exclude=REFERENCE_DECAY_EXCLUDE))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50v2", choices=sorted(KERAS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from advalign_jax.data.tf_env import import_tf  # pylint: disable=import-outside-toplevel

    tf = import_tf()
    import keras  # pylint: disable=import-outside-toplevel

    import reference_harmonization as ref  # pylint: disable=import-outside-toplevel

    km = getattr(keras.applications, KERAS[args.arch])(weights=None, input_shape=(args.size, args.size, 3),
                                                       classifier_activation=None)
    with tempfile.TemporaryDirectory() as tmp:
        km.save(os.path.join(tmp, "m.h5"))
        convert(os.path.join(tmp, "m.h5"), args.arch, os.path.join(tmp, "ours"), input_size=args.size)
        model, variables = load_model(os.path.join(tmp, "ours"))

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, size=args.batch)
    heat = rng.uniform(size=(args.batch, args.size, args.size)).astype(np.float32) ** 4
    tokens = np.ones(args.batch, np.float32)
    batch = {"image": jnp.asarray(x), "label": jnp.asarray(labels), "heatmap": jnp.asarray(heat),
             "token": jnp.asarray(tokens)}
    state = {"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {}

    def step_fn(objective, m):
        return jax.jit(jax.grad(lambda p: objective.loss(m, p, state, batch, None, cfg())[0]))

    rows = {}
    params = variables["params"]
    ce_step = step_fn(ce_objective, model)
    h_step = step_fn(harmonizer, model)
    rows["ours: CE step"] = best_time(lambda: jax.block_until_ready(ce_step(params)), args.repeats)
    rows["ours: harmonizer step"] = best_time(lambda: jax.block_until_ready(h_step(params)), args.repeats)

    memory = {}
    for remat in (False, True):
        m = get_model(args.arch, **{**model.options, "remat": remat})
        lowered = jax.jit(jax.grad(lambda p: harmonizer.loss(m, p, state, batch, None, cfg())[0])).lower(params)
        analysis = lowered.compile().memory_analysis()
        memory[remat] = getattr(analysis, "temp_size_in_bytes", float("nan"))

    # The reference: the package's loss on the Keras model (inputs preprocessed as the harmonized
    # models expect: (x - mean) / std; our converted model holds the same normalisation).
    norm_x = tf.constant(((x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32))

    class Adapter:
        def __call__(self, t, training=False):
            return km(t, training=training)

        @property
        def trainable_variables(self):
            return [v.value for v in km.trainable_variables]

    adapter = Adapter()
    onehot = tf.constant(np.eye(1000, dtype=np.float32)[labels])
    ref_loss = ref.load("training.loss")
    ref_step = tf.function(lambda: ref_loss.harmonizer_loss(adapter, norm_x, tf.constant(tokens), onehot,
                                                            tf.constant(heat)))

    @tf.function
    def ref_ce():
        with tf.GradientTape() as tape:
            logits = km(norm_x, training=True)
            loss = tf.reduce_mean(ref_loss.Cross_entropy(onehot, logits))
        return tape.gradient(loss, km.trainable_variables)

    rows["reference (TF): CE step"] = best_time(lambda: [g.numpy() for g in ref_ce()], args.repeats)
    rows["reference (TF): harmonizer_loss step"] = best_time(lambda: [g.numpy() for g in ref_step()], args.repeats)

    print(f"{args.arch}, batch {args.batch}, {args.size} px, float32, best of {args.repeats}, "
          f"{os.cpu_count()} CPU cores")
    print("| step | seconds | images/s |")
    print("|---|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {t:.3f} | {args.batch / t:.2f} |")
    print(f"double-backprop overhead (harmonizer / CE): ours {rows['ours: harmonizer step'] / rows['ours: CE step']:.2f}x, "
          f"reference {rows['reference (TF): harmonizer_loss step'] / rows['reference (TF): CE step']:.2f}x")
    print(f"ours / reference, harmonizer step: {rows['reference (TF): harmonizer_loss step'] / rows['ours: harmonizer step']:.2f}x faster")
    print(f"peak temporary memory of our harmonizer step (XLA): without remat {memory[False] / 2**20:.0f} MiB, "
          f"with remat {memory[True] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
