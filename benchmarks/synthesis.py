"""Class-conditional generation (:func:`advalign_jax.synthesis.ops.generate`: the ``robustness``
library's targeted L2 attack) against the same attack in PyTorch one image at a time and batched, and
against its arithmetic floor, on the same model, weights and seeds, in one run on the same machine.

    python benchmarks/synthesis.py [--size 32] [--images 32] [--steps 60] [--repeats 3] [--threads N]
                                   [--no-torch]

The workload: ``--images`` seeds (uniform in [0, 1], fixed), each attacked towards class ``i mod 10``
by ``--steps`` normalised L2 steps of 0.5 inside an L2 ball of radius 30 (the CIFAR generation recipe),
``torch.renorm`` projection, clip to [0, 1], the best iterate (``use_best``), on the zoo's ``small_cnn``
at ``--size`` px (stem patch ``size / 16``, widths 24-32-64-96, random BatchNorm statistics).

Methods (the table's rows):

- ``ours``: ``jax.jit`` of ``generate`` over the whole batch;
- ``PyTorch, one image at a time``: the library's ``Attacker`` loop as a generation script runs it
  without batching: for each image, ``steps`` eager passes with ``autograd.grad``, the step, the
  ``renorm`` projection, the clamp and the best-iterate bookkeeping, at batch 1;
- ``PyTorch, batched``: the same loop on the whole batch.

PyTorch holds a ``torch.nn`` twin of the model with the same weights (``benchmarks/sensitivity.py``'s,
checked against ours to 1e-4 at the start, the line printed); the largest difference between our images
and the batched PyTorch ones is printed too. The floor: the measured time of one forward-backward pass
of the model on the batch (``jit`` of the input-gradient of the summed target log-probabilities) times
``steps + 1`` (every step's pass and the final iterate's), plus one forward pass. Timing: each method
warmed up, then ``--repeats`` interleaved rounds, the median of each (``benchmarks/timing.py``); XLA:CPU
and PyTorch get the same threads (``OMP_WAIT_POLICY=PASSIVE`` unless set, as in ``sensitivity.py``).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from sensitivity import build, check_twin, jax_threads  # noqa: E402  (benchmarks/sensitivity.py)
from timing import interleaved_times, ratio_summary  # noqa: E402  (benchmarks/timing.py)

from advalign_jax.synthesis import ops  # noqa: E402

EPS, STEP = 30.0, 0.5


def torch_generate(net, x0, target, steps: int):
    """The ``robustness`` library's targeted L2 attack in eager PyTorch (``x0`` NCHW), best iterate."""
    import torch  # optional: the reference side

    x = x0.clone()
    best_x, best_loss = x0.clone(), None
    for i in range(steps + 1):
        x = x.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(net.logits(x), target, reduction="none")
        with torch.no_grad():
            better = torch.ones_like(loss, dtype=torch.bool) if best_loss is None else loss < best_loss
            best_x[better] = x.detach()[better]
            best_loss = loss.detach().clone() if best_loss is None else torch.where(better, loss.detach(), best_loss)
        if i == steps:
            break
        (g,) = torch.autograd.grad(-loss.sum(), x)
        with torch.no_grad():
            n = g.reshape(len(g), -1).norm(dim=1).view(-1, 1, 1, 1)
            x = x + STEP * g / (n + 1e-10)
            x = torch.clamp(x0 + (x - x0).renorm(p=2, dim=0, maxnorm=EPS), 0, 1)
    return best_x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="image side (a multiple of 16; default 32)")
    p.add_argument("--images", type=int, default=32, help="images generated (default 32)")
    p.add_argument("--steps", type=int, default=60, help="attack steps (default 60, the recipe's)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: as many as XLA:CPU uses)")
    p.add_argument("--no-torch", action="store_true", help="only ours and the floor")
    args = p.parse_args(argv)
    if args.images < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--images, --steps and --repeats must be positive")
    model, variables, net = build("small_cnn", args.size, not args.no_torch)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.images, args.size, args.size, 3)).astype(np.float32)
    target = (np.arange(args.images) % 10).astype(np.int32)
    rec = ops.Recipe(EPS, STEP, args.steps, use_best=True)
    jx, jt = jnp.asarray(x), jnp.asarray(target)

    notes = []
    start = time.perf_counter()
    ours_c = jax.jit(lambda v, s, t: ops.generate(model.logits_fn(v), s, t, rec)[0]).lower(variables, jx, jt).compile()
    notes.append(f"ours: compiled in {time.perf_counter() - start:.1f} s (not in the table)")

    def fwd_bwd(v, s, t):
        return jax.grad(lambda z: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(model.apply(v, z)), t[:, None], 1)))(s)

    fb_c = jax.jit(fwd_bwd).lower(variables, jx, jt).compile()
    fwd_c = jax.jit(lambda v, s: model.apply(v, s)).lower(variables, jx).compile()
    results = {}

    def ours():
        results["ours"] = np.asarray(jax.block_until_ready(ours_c(variables, jx, jt)))

    fns = {"ours": ours, "pass": lambda: jax.block_until_ready(fb_c(variables, jx, jt)),
           "forward": lambda: jax.block_until_ready(fwd_c(variables, jx))}
    if net is not None:
        import torch  # optional: the reference side

        torch.set_num_threads(args.threads or jax_threads())
        notes.insert(0, check_twin(model, variables, net, x[:4]))
        tx, tt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(target.astype(np.int64))

        def batched():
            results["batched"] = torch_generate(net, tx, tt, args.steps).numpy().transpose(0, 2, 3, 1)

        def loop():
            for i in range(args.images):
                torch_generate(net, tx[i:i + 1], tt[i:i + 1], args.steps)

        fns.update({"loop": loop, "batched": batched})
    times = interleaved_times(fns, args.repeats)
    med = {k: float(np.median(v)) for k, v in times.items()}
    floor_rounds = [(args.steps + 1) * a + f for a, f in zip(times["pass"], times["forward"])]
    if "batched" in results:
        notes.append(f"ours vs PyTorch batched: images max |diff| {np.abs(results['ours'] - results['batched']).max():.1e} "
                     "(float32: equal to 1e-7 over the first few steps, then rounding through the ReLU kinks and the "
                     "normalised step sends trajectories apart; tests/synthesis/test_ops.py has the float64 parity)")

    device = jax.devices()[0].device_kind
    head = (f"# class-conditional generation, small_cnn {args.size}px float32, {args.images} images x {args.steps} "
            f"steps (L2 eps {EPS:g}, step {STEP:g}, best iterate); {device}, {os.cpu_count()} CPU cores, 1-minute "
            f"load {os.getloadavg()[0]:.1f}; jax {jax.__version__}")
    if net is not None:
        head += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(head + f"; median of {args.repeats} interleaved rounds")
    for line in notes:
        print(line)
    print("| method | batch | seconds | images/s | ratio vs ours |")
    print("|---|---|---|---|---|")
    rows = [("ours (jit, batched)", "ours", args.images)]
    if net is not None:
        rows += [("PyTorch, one image at a time", "loop", 1), ("PyTorch, batched", "batched", args.images)]
    for label, name, batch in rows:
        ratio = "1.00" if name == "ours" else "{:.2f} [{:.2f}, {:.2f}]".format(*ratio_summary(times[name], times["ours"]))
        print(f"| {label} | {batch} | {med[name]:.3f} | {args.images / med[name]:.1f} | {ratio} |")
    floor = float(np.median(floor_rounds))
    print(f"floor: {args.steps + 1} forward-backward passes of the batch + one forward = {floor:.3f} s; "
          f"ours / floor = {float(np.median([o / f for o, f in zip(times['ours'], floor_rounds)])):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
