"""The full minimal-eps protocol: our batched, compiled search vs the reference formulation.

    python benchmarks/minimal_eps_search.py [--models small_cnn resnet18] [--images 16] [--batch 16]

For each model, on the same weights and images in one run:

- ``reference``: the adversarial-alignment study's loop (its notebook): one image at a time, eager
  PyTorch, 3-step L2 attacks with the ``sphere`` rescaling, the eps = 10 gate, the eps = 1 split and
  the bisection (:func:`tests.reference_attacks.reference_protocol`), on a PyTorch copy of the model
  whose logits match ours;
- ``eager JAX``: the same loop, one image at a time, calling our (uncompiled) attack per image;
- ``ours``: :func:`advalign_jax.attacks.search.reference_search`, one compiled function per batch.

It prints images/s of each, the ratio ours / reference, and the fraction of the arithmetic floor our
run reaches: ``91 forward-equivalents x forward FLOPs (XLA's count) / measured peak FLOP/s`` (peak:
the best of large float32 matmuls and convolutions in JAX on this machine).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "references"))

from advalign_jax.attacks.search import (REFERENCE_ATTACK, ReferenceSearch,  # noqa: E402
                                         forward_equivalents_per_image, reference_search)
from advalign_jax.models import get_model  # noqa: E402


def measured_peak_flops() -> float:
    """Best FLOP/s of float32 matmuls and 3x3 convolutions compiled by XLA on this machine."""
    best = 0.0
    for n in (1024, 2048):
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a)
        f(a).block_until_ready()
        t = time.perf_counter()
        for _ in range(5):
            f(a).block_until_ready()
        best = max(best, 5 * 2 * n ** 3 / (time.perf_counter() - t))
    x = jnp.ones((32, 56, 56, 128), jnp.float32)
    w = jnp.ones((3, 3, 128, 128), jnp.float32)
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    conv(x, w).block_until_ready()
    t = time.perf_counter()
    for _ in range(3):
        conv(x, w).block_until_ready()
    best = max(best, 3 * 2 * 32 * 56 * 56 * 128 * 128 * 9 / (time.perf_counter() - t))
    return best


def forward_flops(model, variables, size) -> float:
    lowered = jax.jit(model.apply).lower(variables, jnp.zeros((1, size, size, 3)))
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def torch_copy(name, model, variables):
    """A PyTorch model computing the same logits (weights copied), or None if unavailable."""
    import torch  # pylint: disable=import-outside-toplevel

    if name == "small_cnn":
        return _torch_small_cnn(model, variables)
    if name == "resnet18":
        import torch_resnet  # tests/references/torch_resnet.py  pylint: disable=import-outside-toplevel

        net = torch_resnet.resnet("resnet18", num_classes=model.num_classes)
        from advalign_jax.models.convert import import_weights  # pylint: disable=import-outside-toplevel

        state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
        _, imported = import_weights(state, "torch", "resnet18", num_classes=model.num_classes)
        variables.clear()
        variables.update(imported)
        mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
        return torch.nn.Sequential(_Normalize(mean, std), net).eval()
    return None


def _Normalize(mean, std):  # noqa: N802
    import torch  # pylint: disable=import-outside-toplevel

    class Normalize(torch.nn.Module):
        def forward(self, x):
            return (x - mean) / std

    return Normalize()


def _torch_small_cnn(model, variables):
    import torch  # pylint: disable=import-outside-toplevel

    p, s = variables["params"], variables["batch_stats"]
    widths = model.options["widths"]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            patch = model.options["patch"]
            self.stem = torch.nn.Conv2d(3, widths[0], patch, patch)
            self.convs = torch.nn.ModuleList()
            self.bns = torch.nn.ModuleList()
            for a, b in zip(widths[:-1], widths[1:]):
                self.convs.append(torch.nn.Conv2d(a, b, 3, 1, 1, bias=False))
                self.bns.append(torch.nn.BatchNorm2d(b, eps=1e-5))
            self.head = torch.nn.Linear(widths[-1], model.num_classes)

        def forward(self, x):
            mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
            x = torch.relu(self.stem((x - mean) / std))
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
                x = torch.relu(bn(conv(x)))
                if i < len(self.convs) - 1:
                    x = torch.nn.functional.max_pool2d(x, 2, 2)
            return self.head(x.mean((2, 3)))

    net = Net().eval()
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    with torch.no_grad():
        net.stem.weight.copy_(t(p["stem"]["kernel"]).permute(3, 2, 0, 1))
        net.stem.bias.copy_(t(p["stem"]["bias"]))
        for i, (conv, bn) in enumerate(zip(net.convs, net.bns)):
            blk, st = p[f"stage{i + 1}"], s[f"stage{i + 1}"]
            conv.weight.copy_(t(blk["conv"]["kernel"]).permute(3, 2, 0, 1))
            bn.weight.copy_(t(blk["bn"]["scale"]))
            bn.bias.copy_(t(blk["bn"]["bias"]))
            bn.running_mean.copy_(t(st["bn"]["mean"]))
            bn.running_var.copy_(t(st["bn"]["var"]))
        net.head.weight.copy_(t(p["head"]["kernel"]).T)
        net.head.bias.copy_(t(p["head"]["bias"]))
    return net


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--skip-eager-jax", action="store_true")
    args = parser.parse_args()

    import torch  # pylint: disable=import-outside-toplevel

    from reference_attacks import alignment_attack, reference_protocol  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(os.cpu_count())
    peak = measured_peak_flops()
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models:
        model = get_model(name, num_classes=10 if name == "small_cnn" else 1000)
        variables = dict(model.init(jax.random.PRNGKey(0)))
        net = torch_copy(name, model, variables)
        x = rng.uniform(0, 1, size=(args.images, args.size, args.size, 3)).astype(np.float32)
        logits = np.asarray(model.apply(variables, x))
        y = logits.argmax(1)  # every image starts correctly classified: the full protocol runs
        with torch.no_grad():
            t_logits = net(torch.tensor(x.transpose(0, 3, 1, 2))).numpy()
        match = float(np.abs(t_logits - logits).max() / np.abs(logits).max())

        search = jax.jit(lambda v, x, y: reference_search(model.logits_fn(v), x, y))
        b = min(args.batch, args.images)
        jax.block_until_ready(search(variables, x[:b], y[:b]))  # compile (reported separately)
        t = time.perf_counter()
        compiled_start = t
        outs = [search(variables, x[i:i + b], y[i:i + b]) for i in range(0, args.images, b)]
        jax.block_until_ready(outs)
        ours = args.images / (time.perf_counter() - t)
        del compiled_start

        def attack_torch(m, xi, yi, eps):
            return alignment_attack(m, xi, yi, eps, projection="sphere", clip=(0.0, 1.0))

        t = time.perf_counter()
        n_ref = min(args.images, 4)
        ref_eps = []
        for i in range(n_ref):
            xi = x[i:i + 1].transpose(0, 3, 1, 2).copy()
            r = reference_protocol(net, xi, y[i:i + 1], attack=attack_torch)
            ref_eps.append(r[0] if isinstance(r, tuple) else np.nan)
        reference = n_ref / (time.perf_counter() - t)
        ours_eps = np.concatenate([np.asarray(o["eps"]) for o in outs])[:n_ref]

        eager = float("nan")
        if not args.skip_eager_jax:
            from advalign_jax.attacks.pgd import pgd  # pylint: disable=import-outside-toplevel

            f = model.logits_fn(variables)
            t = time.perf_counter()
            xi, yi = x[:1], y[:1]
            with jax.disable_jit():
                for eps in (10.0, 1.0):  # two of the nine attacks of one image, then scaled
                    pgd(f, xi, yi, eps, REFERENCE_ATTACK)
            eager = 1.0 / ((time.perf_counter() - t) / 2 * 9)

        fwd = forward_flops(model, variables, args.size)
        floor = forward_equivalents_per_image(REFERENCE_ATTACK, ReferenceSearch()) * fwd / peak
        rows.append((name, args.size, fwd / 1e9, ours, reference, eager, ours / reference, floor * ours, match,
                     float(np.nanmax(np.abs(np.asarray(ref_eps) - ours_eps)))))

    print(f"minimal-eps protocol, {args.images} images (reference: {min(args.images, 4)}), batch {args.batch}, "
          f"{os.cpu_count()} CPU cores, measured peak {peak / 1e9:.1f} GFLOP/s")
    print("| model | px | GFLOP/fwd | ours img/s | reference img/s (eager PyTorch, batch 1) | eager JAX img/s | "
          "ours / reference | fraction of floor | logit match | max eps difference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.1f}x | "
              f"{r[7]:.2f} | {r[8]:.1e} | {r[9]:.2g} |")


if __name__ == "__main__":
    main()
