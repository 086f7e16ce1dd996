"""The PAG training step: its cost over a plain step, ours vs the official replicated-batch PyTorch
formulation, and peak memory as K grows.

    python benchmarks/pag_step.py [--arch cifar_resnet18] [--batch 16] [--k 10] [--repeats 3]

On the CIFAR ResNet-18 of PAG (32x32, 10 classes), with the same random weights in both frameworks
(tests/torch_cifar.py's PyTorch module, imported through our torch importer), the same batch and
target gradients, on the same machine in one run:

- ``plain step``: the parameter gradient of cross-entropy (training-mode BatchNorm);
- ``PAG step (shared)``: CE + weight x (1 - mean cos) over K target classes per image, K input-gradients
  from ONE forward pass (K cotangents through one VJP), double backprop;
- ``PAG step (replicated)``: our implementation of the official semantics (a second forward pass over
  the batch replicated K times);
- the reference: ``tests/torch_pag_reference.official_pag_loss`` (the official code's step: a Python
  loop building the N*K replicated batch, ``autograd.grad(create_graph=True)``, backward), and a plain
  PyTorch CE step.

It prints step times, PAG / plain (goal at most 4x at K = 10), ours / the PyTorch reference (goal at
least 1.5x), and XLA's peak temporary memory of the shared PAG step for K = 1, 2, 5, 10.
"""

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from timing import best_time  # noqa: E402  (benchmarks/timing.py)

from advalign_jax.losses import pag as P  # noqa: E402
from advalign_jax.models.checkpoint import load_model  # noqa: E402
from advalign_jax.models.convert import convert  # noqa: E402



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=10, help="target classes per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=0, help="PyTorch threads (0: its default)")
    args = parser.parse_args()

    import torch  # pylint: disable=import-outside-toplevel

    import torch_cifar  # pylint: disable=import-outside-toplevel
    import torch_pag_reference as ref  # pylint: disable=import-outside-toplevel

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    net = torch_cifar.randomise(torch_cifar.TorchCifarResNet(), seed=0).train()

    class Logits(torch.nn.Module):  # the reference module also returns its stage activations
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t)[0]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(net.state_dict(), os.path.join(tmp, "w.pth"))
        convert(os.path.join(tmp, "w.pth"), "cifar_resnet18", os.path.join(tmp, "ours"))
        model, variables = load_model(os.path.join(tmp, "ours"))

    n, c, k = args.batch, 10, args.k
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, c, size=n).astype(np.int32)
    targets = rng.normal(size=(n, c, 32, 32, 3)).astype(np.float32)
    orders = np.stack([rng.permutation(c) for _ in range(n)]).astype(np.int32)
    classes = orders[:, :k]
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}

    def apply_fn(p):
        return lambda st, xi: model.apply_train({"params": p, **st}, xi)

    def pag_step(semantics, kk, cls):
        cfg = P.PAGConfig(weight=15.0, reduction="mean", num_targets=kk if kk < c else None, semantics=semantics)
        return jax.jit(jax.grad(lambda p: P.pag_loss(apply_fn(p), state, jnp.asarray(x), jnp.asarray(y),
                                                     jnp.asarray(targets), cfg, classes=jnp.asarray(cls))[0]))

    def ce(p):
        logits, _ = apply_fn(p)(state, jnp.asarray(x))
        return P.cross_entropy(logits, jnp.asarray(y))

    rows = {}
    plain = jax.jit(jax.grad(ce))
    shared = pag_step("shared", k, classes)
    replicated = pag_step("replicated", k, classes)
    rows["ours: plain step"] = best_time(lambda: jax.block_until_ready(plain(params)), args.repeats)
    rows[f"ours: PAG step, shared (K={k})"] = best_time(lambda: jax.block_until_ready(shared(params)), args.repeats)
    rows[f"ours: PAG step, replicated (K={k})"] = best_time(lambda: jax.block_until_ready(replicated(params)),
                                                        args.repeats)

    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ty = torch.from_numpy(y.astype(np.int64))
    tt = torch.from_numpy(targets.transpose(0, 1, 4, 2, 3).copy())
    tc = torch.from_numpy(classes.astype(np.int64))

    def torch_plain():
        net.zero_grad()
        torch.nn.CrossEntropyLoss()(net(tx)[0], ty).backward()

    def torch_pag():
        net.zero_grad()
        loss, _ = ref.official_pag_loss(Logits(net), tx, tt, ty, tc, 1.5)
        loss.backward()

    rows["reference (PyTorch): plain step"] = best_time(torch_plain, args.repeats)
    rows[f"reference (PyTorch): official PAG step (K={k})"] = best_time(torch_pag, args.repeats)

    memory = {}
    for kk in sorted({1, 2, 5, k}):
        cls = orders[:, :kk]
        cfg = P.PAGConfig(weight=15.0, reduction="mean", num_targets=kk if kk < c else None, semantics="shared")
        lowered = jax.jit(jax.grad(lambda p: P.pag_loss(apply_fn(p), state, jnp.asarray(x), jnp.asarray(y),
                                                        jnp.asarray(targets), cfg, classes=jnp.asarray(cls))[0]))
        analysis = lowered.lower(params).compile().memory_analysis()
        memory[kk] = getattr(analysis, "temp_size_in_bytes", float("nan"))

    print(f"cifar_resnet18, batch {n}, 32 px, float32, best of {args.repeats}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print("| step | seconds | images/s |")
    print("|---|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {t:.3f} | {n / t:.1f} |")
    ours = rows[f"ours: PAG step, shared (K={k})"]
    print(f"PAG / plain: ours {ours / rows['ours: plain step']:.2f}x (goal <= 4x), "
          f"PyTorch reference {rows[f'reference (PyTorch): official PAG step (K={k})'] / rows['reference (PyTorch): plain step']:.2f}x")
    print(f"ours (shared) vs the PyTorch reference, PAG step: "
          f"{rows[f'reference (PyTorch): official PAG step (K={k})'] / ours:.2f}x faster (goal >= 1.5x)")
    print("peak temporary memory of our shared PAG step (XLA): "
          + ", ".join(f"K={kk}: {v / 2**20:.0f} MiB" for kk, v in memory.items()))


if __name__ == "__main__":
    main()
