"""The harmonizer's training step: its double-backprop overhead, and ours vs the reference TensorFlow loss.

    python benchmarks/harmonizer_step.py [--arch resnet50v2] [--batch 8] [--size 224] [--repeats 3]
                                         [--no-reference] [--no-memory]

On the same architecture (Keras ``ResNet50V2`` and our ``resnet50v2`` with the same random weights,
converted through the importer), the same batch, on the same machine in one run:

- ``CE step``: the gradient of label-smoothed cross-entropy w.r.t. the parameters (training mode);
- ``harmonizer step``: the gradient of the full harmonizer loss (CE + L2 + lambda x pyramidal
  alignment of the saliency from the same forward pass): double backprop, in both orders of
  differentiation (``objective.differentiation``, the "formulation" column): ``reverse_over_reverse``
  (the gradient goes back through the saliency's VJP) and ``reverse_over_forward`` (the gradient of a
  forward-mode directional derivative along the loss's cotangent), timed in turn round after round
  (their ratio: the median of the per-round ratios); the largest relative difference of their
  parameter gradients is printed;
- the reference: the harmonization package's ``harmonizer_loss`` (TensorFlow, GradientTape inside a
  ``tf.function``) on the Keras model, and a plain Keras CE step (``--no-reference``: skipped).

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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "references"))

from timing import best_time, interleaved_times, ratio_summary  # noqa: E402  (benchmarks/timing.py)

from advalign_jax.models import get_model  # noqa: E402
from advalign_jax.models.convert import convert  # noqa: E402
from advalign_jax.models.checkpoint import load_model  # noqa: E402
from advalign_jax.training.config_blocks import REFERENCE_DECAY_EXCLUDE  # noqa: E402
from advalign_jax.training.objectives import ce as ce_objective  # noqa: E402
from advalign_jax.training.objectives import harmonizer  # noqa: E402

KERAS = {"resnet50v2": "ResNet50V2", "vgg16": "VGG16", "efficientnet_b0": "EfficientNetB0",
         "convnext_tiny": "ConvNeXtTiny"}



def cfg(differentiation=harmonizer.DEFAULT_DIFFERENTIATION):
    return ml_collections.ConfigDict(dict(lambda_harmonization=1.0, pyramid_levels=5, saliency="mean",
                                          label_smoothing=0.1, weight_decay=1e-5,
                                          decay_exclude=REFERENCE_DECAY_EXCLUDE,
                                          differentiation=differentiation))


def max_rel_diff(a, b) -> float:
    return max(float(jnp.abs(u - w).max() / jnp.maximum(jnp.abs(w).max(), 1e-30))
               for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50v2", choices=sorted(KERAS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the TensorFlow reference (our model gets random weights of its own)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory comparison of remat")
    args = parser.parse_args()

    if args.no_reference:
        model = get_model(args.arch, input_size=args.size)
        variables = dict(model.init(jax.random.PRNGKey(0)))
    else:
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

    def step_fn(objective, m, order=harmonizer.DEFAULT_DIFFERENTIATION):
        return jax.jit(jax.grad(lambda p: objective.loss(m, p, state, batch, None, cfg(order))[0]))

    rows, grads = {}, {}
    params = variables["params"]
    ce_step = step_fn(ce_objective, model)
    rows["ours: CE step"] = best_time(lambda: jax.block_until_ready(ce_step(params)), args.repeats)
    steps = {}
    for order in harmonizer.DIFFERENTIATIONS:
        h_step = step_fn(harmonizer, model, order)
        grads[order] = h_step(params)
        steps[order] = lambda h_step=h_step: jax.block_until_ready(h_step(params))
    times = interleaved_times(steps, args.repeats)  # in turn, round after round: the same load on both
    for order in harmonizer.DIFFERENTIATIONS:
        rows[f"ours: harmonizer step, {order}"] = min(times[order])
    rows["_ratio"] = ratio_summary(times[harmonizer.DIFFERENTIATIONS[1]], times[harmonizer.DIFFERENTIATIONS[0]])
    default_row = f"ours: harmonizer step, {harmonizer.DEFAULT_DIFFERENTIATION}"

    memory = {}
    for remat in () if args.no_memory else (False, True):
        for order in harmonizer.DIFFERENTIATIONS:
            m = get_model(args.arch, **{**model.options, "remat": remat})
            lowered = jax.jit(jax.grad(lambda p, m=m, order=order: harmonizer.loss(m, p, state, batch, None,
                                                                                cfg(order))[0])).lower(params)
            analysis = lowered.compile().memory_analysis()
            memory[(remat, order)] = getattr(analysis, "temp_size_in_bytes", float("nan"))
    if args.no_reference:
        report(args, rows, grads, memory, default_row)
        return

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

    report(args, rows, grads, memory, default_row)


def report(args, rows, grads, memory, default_row):
    median, low, high = rows.pop("_ratio")
    print(f"{args.arch}, batch {args.batch}, {args.size} px, float32, best of {args.repeats}, "
          f"{os.cpu_count()} CPU cores, 1-minute load {os.getloadavg()[0]:.1f}, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}")
    print("| step | seconds | images/s |")
    print("|---|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {t:.3f} | {args.batch / t:.2f} |")
    print(f"reverse-over-forward / reverse-over-reverse time {median:.2f} (median of {args.repeats} interleaved "
          f"rounds, {low:.2f}-{high:.2f}); largest relative difference of the parameter gradients {max_rel_diff(*(grads[o] for o in harmonizer.DIFFERENTIATIONS)):.1e}")
    print(f"double-backprop overhead (harmonizer / CE): ours {rows[default_row] / rows['ours: CE step']:.2f}x", end="")
    if "reference (TF): CE step" in rows:
        ref_h = rows["reference (TF): harmonizer_loss step"]
        print(f", reference {ref_h / rows['reference (TF): CE step']:.2f}x")
        print(f"ours / reference, harmonizer step: {ref_h / rows[default_row]:.2f}x faster")
    else:
        print()
    if memory:
        print("peak temporary memory of our harmonizer step (XLA): " + "; ".join(
            f"{order} without remat {memory[(False, order)] / 2**20:.0f} MiB, with remat "
            f"{memory[(True, order)] / 2**20:.0f} MiB" for order in harmonizer.DIFFERENTIATIONS))


if __name__ == "__main__":
    main()
