"""The PAG training step: its cost over a plain step, the two orders of differentiation, ours vs the
official replicated-batch PyTorch formulation, peak memory as K grows, and where the time goes.

    python benchmarks/pag_step.py [--batch 16] [--k 10] [--repeats 3] [--no-torch] [--profile]

On the CIFAR ResNet-18 of PAG (32x32, 10 classes), with the same random weights in both frameworks
(tests/references/torch_cifar.py's PyTorch module, imported through our torch importer), the same batch and
target gradients, on the same machine in one run:

- ``plain step``: the parameter gradient of cross-entropy (training-mode BatchNorm);
- ``PAG step (shared)``: CE + weight x (1 - mean cos) over K target classes per image, K input-gradients
  from ONE forward pass (K cotangents through one VJP);
- ``PAG step (replicated)``: our implementation of the official semantics (a second forward pass over
  the batch replicated K times);
- each PAG step in both orders of differentiation (``PAGConfig.differentiation``, the "formulation"
  column): ``reverse_over_reverse`` (the gradient goes back through the K VJPs) and
  ``reverse_over_forward`` (the gradient of K forward-mode directional derivatives along the loss's
  cotangent), timed in turn round after round (their ratio: the median of the per-round ratios);
  the largest difference of their parameter gradients is printed;
- the reference: ``tests/references/torch_pag_reference.official_pag_loss`` (the official code's step: a Python
  loop building the N*K replicated batch, ``autograd.grad(create_graph=True)``, backward), and a plain
  PyTorch CE step.

It prints step times, PAG / plain (goal at most 4x at K = 10), ours / the PyTorch reference (goal at
least 1.5x), and XLA's peak temporary memory of the shared PAG step for K = 1, 2, 5, 10 in each
formulation. ``--profile`` adds where the shared step's time goes: the forward pass, the forward
pass with the K input-gradients, and the full step, each with XLA's FLOP count and the rate reached.
"""

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "references"))
sys.path.insert(0, os.path.dirname(__file__))

from timing import best_time, interleaved_times, ratio_summary  # noqa: E402  (benchmarks/timing.py)

from advalign_jax.losses import pag as P  # noqa: E402
from advalign_jax.models import get_model  # noqa: E402
from advalign_jax.models.checkpoint import load_model  # noqa: E402
from advalign_jax.models.convert import convert  # noqa: E402

FORMULATIONS = P.DIFFERENTIATIONS
NUM_CLASSES = 10


def torch_net_and_ours(seed=0, device="cpu"):
    """The PyTorch CIFAR ResNet-18 (random weights) and ours with the same weights; None for the
    PyTorch side when torch (or tests/references/torch_cifar.py) is unavailable."""
    try:
        import torch  # pylint: disable=import-outside-toplevel

        import torch_cifar  # pylint: disable=import-outside-toplevel
    except ImportError:
        model = get_model("cifar_resnet18", num_classes=NUM_CLASSES)
        return None, model, dict(model.init(jax.random.PRNGKey(seed)))
    net = torch_cifar.randomise(torch_cifar.TorchCifarResNet(), seed=seed).train()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(net.state_dict(), os.path.join(tmp, "w.pth"))
        convert(os.path.join(tmp, "w.pth"), "cifar_resnet18", os.path.join(tmp, "ours"))
        model, variables = load_model(os.path.join(tmp, "ours"))
    return net.to(device), model, variables


def make_data(n, k, seed=0, size=32):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, size, size, 3)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
    targets = rng.normal(size=(n, NUM_CLASSES, size, size, 3)).astype(np.float32)
    orders = np.stack([rng.permutation(NUM_CLASSES) for _ in range(n)]).astype(np.int32)
    return x, y, targets, orders, orders[:, :k]


def pag_grad_fn(model, variables, x, y, targets, classes, semantics="shared", formulation=FORMULATIONS[0],
                dtype=jnp.float32):
    """The jitted parameter gradient of our PAG loss (weight 15, 'mean'), a function of the params."""
    state = {"batch_stats": variables["batch_stats"]}
    k = classes.shape[1]
    cfg = P.PAGConfig(weight=15.0, reduction="mean", num_targets=k if k < NUM_CLASSES else None,
                      semantics=semantics, differentiation=formulation)
    x, y, targets, classes = (jnp.asarray(x, dtype), jnp.asarray(y), jnp.asarray(targets, dtype),
                              jnp.asarray(classes))

    def loss(p):
        apply_fn = lambda st, xi: model.apply_train({"params": p, **st}, xi)  # noqa: E731
        return P.pag_loss(apply_fn, state, x, y, targets, cfg, classes=classes)[0]

    return jax.jit(jax.grad(loss))


def plain_grad_fn(model, variables, x, y):
    state = {"batch_stats": variables["batch_stats"]}
    x, y = jnp.asarray(x), jnp.asarray(y)

    def ce(p):
        logits, _ = model.apply_train({"params": p, **state}, x)
        return P.cross_entropy(logits, y)

    return jax.jit(jax.grad(ce))


def temp_bytes(fn, *args) -> float:
    analysis = fn.lower(*args).compile().memory_analysis()
    return float(getattr(analysis, "temp_size_in_bytes", float("nan")))


def flops(fn, *args) -> float:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def torch_steps(net, x, y, targets, classes, device="cpu"):
    """The PyTorch plain CE step and the official PAG step as callables (they block until done)."""
    import torch  # pylint: disable=import-outside-toplevel

    import torch_pag_reference as ref  # pylint: disable=import-outside-toplevel

    class Logits(torch.nn.Module):  # the reference module also returns its stage activations
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t)[0]

    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
    ty = torch.from_numpy(y.astype(np.int64)).to(device)
    tt = torch.from_numpy(targets.transpose(0, 1, 4, 2, 3).copy()).to(device)
    tc = torch.from_numpy(classes.astype(np.int64)).to(device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def plain():
        net.zero_grad()
        torch.nn.CrossEntropyLoss()(net(tx)[0], ty).backward()
        sync()

    def pag():
        net.zero_grad()
        loss, _ = ref.official_pag_loss(Logits(net), tx, tt, ty, tc, 1.5)
        loss.backward()
        sync()

    return plain, pag


def max_rel_diff(a, b) -> float:
    return max(float(jnp.abs(u - w).max() / jnp.maximum(jnp.abs(w).max(), 1e-30))
               for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def profile(model, variables, x, y, targets, classes, repeats):
    """Where the time of the shared PAG step goes: (name, seconds, XLA GFLOP) per part."""
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    n, k = classes.shape
    xj, cls = jnp.asarray(x), jnp.asarray(classes)
    scale = 1.0 / (n * k)

    def fwd(p):
        return model.apply_train({"params": p, **state}, xj)[0]

    def input_grads(p):  # the K input-gradients, no parameter gradient
        return P.class_input_gradients(lambda xi: model.apply_train({"params": p, **state}, xi), xj, cls, scale)[0]

    parts = [("training-mode forward", jax.jit(fwd)),
             ("plain step (forward + backward)", plain_grad_fn(model, variables, x, y)),
             (f"forward + {k} input-gradients", jax.jit(input_grads))]
    for formulation in FORMULATIONS:
        parts.append((f"PAG step, {formulation}", pag_grad_fn(model, variables, x, y, targets, classes,
                                                              formulation=formulation)))
    rows = []
    for name, fn in parts:
        t = best_time(lambda fn=fn: jax.block_until_ready(fn(params)), repeats)
        rows.append((name, t, flops(fn, params) / 1e9))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=10, help="target classes per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=0, help="PyTorch threads (0: its default)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory sweep over K")
    parser.add_argument("--profile", action="store_true", help="time the parts of the shared step")
    args = parser.parse_args()

    net, model, variables = torch_net_and_ours()
    if args.no_torch:
        net = None
    if net is not None and args.torch_threads:
        import torch  # pylint: disable=import-outside-toplevel

        torch.set_num_threads(args.torch_threads)
    n, k = args.batch, args.k
    x, y, targets, orders, classes = make_data(n, k)
    params = variables["params"]

    rows, grads = [], {}
    plain = plain_grad_fn(model, variables, x, y)
    rows.append(("ours: plain step", "", best_time(lambda: jax.block_until_ready(plain(params)), args.repeats)))
    ratios = {}
    for semantics in ("shared", "replicated"):
        steps = {}
        for formulation in FORMULATIONS:
            step = pag_grad_fn(model, variables, x, y, targets, classes, semantics, formulation)
            grads[(semantics, formulation)] = step(params)
            steps[formulation] = lambda step=step: jax.block_until_ready(step(params))
        # the two orders in turn, round after round: their ratio is measured under the same load
        times = interleaved_times(steps, args.repeats)
        for formulation in FORMULATIONS:
            rows.append((f"ours: PAG step, {semantics} (K={k})", formulation, min(times[formulation])))
        ratios[semantics] = ratio_summary(times[FORMULATIONS[1]], times[FORMULATIONS[0]])
    if net is not None:
        torch_plain, torch_pag = torch_steps(net, x, y, targets, classes)
        rows.append(("reference (PyTorch): plain step", "", best_time(torch_plain, args.repeats)))
        rows.append((f"reference (PyTorch): official PAG step (K={k})", "autograd.grad(create_graph=True)",
                     best_time(torch_pag, args.repeats)))

    memory = {}
    if not args.no_memory:
        for kk in sorted({1, 2, 5, k}):
            for formulation in FORMULATIONS:
                fn = pag_grad_fn(model, variables, x, y, targets, orders[:, :kk], formulation=formulation)
                memory[(kk, formulation)] = temp_bytes(fn, params)

    import_note = ""
    if net is not None:
        import torch  # pylint: disable=import-outside-toplevel

        import_note = f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"cifar_resnet18, batch {n}, 32 px, float32, best of {args.repeats}, {os.cpu_count()} CPU cores, "
          f"1-minute load {os.getloadavg()[0]:.1f}, jax {jax.__version__} on {jax.devices()[0].device_kind}"
          f"{import_note}")
    print("| step | formulation | seconds | images/s |")
    print("|---|---|---|---|")
    for name, formulation, t in rows:
        print(f"| {name} | {formulation} | {t:.3f} | {n / t:.1f} |")
    times = {(name, f): t for name, f, t in rows}
    plain_t = times[("ours: plain step", "")]
    for semantics in ("shared", "replicated"):
        median, low, high = ratios[semantics]
        print(f"{semantics}: reverse-over-forward / reverse-over-reverse time {median:.2f} (median of "
              f"{args.repeats} interleaved rounds, {low:.2f}-{high:.2f}); largest relative difference of the "
              f"parameter gradients {max_rel_diff(*(grads[(semantics, f)] for f in FORMULATIONS)):.1e}")
    best = min(times[(f"ours: PAG step, shared (K={k})", f)] for f in FORMULATIONS)
    print(f"PAG / plain: ours (fastest shared) {best / plain_t:.2f}x (goal <= 4x)", end="")
    if net is not None:
        ref_pag = times[(f"reference (PyTorch): official PAG step (K={k})", "autograd.grad(create_graph=True)")]
        ref_plain = times[("reference (PyTorch): plain step", "")]
        print(f", PyTorch reference {ref_pag / ref_plain:.2f}x")
        print(f"ours (fastest shared) vs the PyTorch reference, PAG step: {ref_pag / best:.2f}x faster (goal >= 1.5x)")
    else:
        print()
    if memory:
        print("peak temporary memory of our shared PAG step (XLA): " + "; ".join(
            f"K={kk}: " + ", ".join(f"{f} {memory[(kk, f)] / 2**20:.0f} MiB" for f in FORMULATIONS)
            for kk in sorted({kk for kk, _ in memory})))
    if args.profile:
        print(f"\nwhere the time of the shared PAG step goes (K={k}, best of {args.repeats}):")
        print("| part | seconds | XLA GFLOP | GFLOP/s |")
        print("|---|---|---|---|")
        for name, t, gf in profile(model, variables, x, y, targets, classes, args.repeats):
            print(f"| {name} | {t:.3f} | {gf:.1f} | {gf / t:.1f} |")


if __name__ == "__main__":
    main()
