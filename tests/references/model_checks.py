"""Shared criteria for comparing a ported model with its original (Keras, PyTorch, timm).

- logits within ``tol`` (1e-4) of the logit scale: ``max|ours - ref| <= tol * max|ref|``;
- one intermediate activation per stage, same criterion;
- the input-gradient of the true-class logit, relative: ``max|g - g_ref| <= tol * max|g_ref|``.

Gradients are taken with respect to the same [0, 1] RGB input on both sides: the original's
preprocessing is written out in front of it, so both differentiate the same function.
"""

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def assert_close(ours, ref, tol=1e-4, what="values"):
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: max error {err:.2e} of the reference's scale (tolerance {tol:.0e})"


def jax_true_class_grad(model, variables, x, labels):
    """d (sum_i logits[i, labels[i]]) / d x for our model (inference mode)."""
    def f(x):
        logits = model.apply(variables, x)
        return jnp.sum(jnp.take_along_axis(logits, jnp.asarray(labels)[:, None], axis=1))
    return np.asarray(jax.grad(f)(jnp.asarray(x)))


def tf_true_class_grad(fn, x, labels):
    """The same for a TensorFlow function ``fn`` of the [0, 1] input."""
    from advalign_jax.data.tf_env import import_tf

    tf = import_tf()
    x = tf.constant(np.asarray(x, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = fn(x)
        picked = tf.reduce_sum(tf.gather(logits, np.asarray(labels), axis=1, batch_dims=1))
    return tape.gradient(picked, x).numpy(), logits.numpy()


def torch_true_class_grad(fn, x_nhwc, labels):
    """The same for a PyTorch function ``fn`` of the NCHW [0, 1] input; returns NHWC gradient and logits
    (float64 for a float64 input, else float32)."""
    import torch

    dtype = np.float64 if np.asarray(x_nhwc).dtype == np.float64 else np.float32
    x = torch.tensor(np.transpose(np.asarray(x_nhwc, dtype), (0, 3, 1, 2)), requires_grad=True)
    logits = fn(x)
    picked = logits[torch.arange(len(labels)), torch.as_tensor(np.asarray(labels))].sum()
    (grad,) = torch.autograd.grad(picked, x)
    return np.transpose(grad.numpy(), (0, 2, 3, 1)), logits.detach().numpy()


def random_images(seed, n, size, channels=3):
    return np.random.default_rng(seed).uniform(0, 1, size=(n, size, size, channels)).astype(np.float32)
