"""Where the minimal-eps search's time goes on a small model: the model's own arithmetic, the attack's
element-wise work, and the compiled loops around them.

    python benchmarks/search_breakdown.py [--model small_cnn] [--size 224] [--batch 16] [--rounds 5]

For one batch, each row is a compiled program timed in alternation with the others, round after round
(the median over the rounds; each round calls every program once, so a change of load falls on all):

- ``search, PGD steps as a loop``: :func:`advalign_jax.attacks.search.reference_search` with each
  attack's 3 steps in a ``lax.fori_loop`` (``PGDConfig(unroll=False)``; 9 PGD attacks of 3 steps: 27
  gradients and 10 forward passes per image);
- ``search, unrolled PGD steps``: the same with the 3 steps unrolled, as ``evaluate`` runs it (the
  default for loops of at most ``pgd.UNROLL_MAX_STEPS`` steps): one straight-line program;
- ``model only``: the search's 27 gradients and 10 forward passes of the model on the batch, each a
  separately compiled call from Python, without the attack's element-wise work (what the model's
  arithmetic alone costs at this batch);
- ``attack only``: the looped search with a model of negligible cost (a linear map of the channel means),
  i.e. the attack's own element-wise work on the images (gradient normalisation, step, sphere
  projection, clipping, selection) and the loops.

The arithmetic floor is ``91 forward-equivalents x forward FLOPs / peak FLOP/s`` (peak: the best large
float32 matmul or convolution XLA runs on this machine, as ``minimal_eps_search.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from advalign_jax.attacks.pgd import per_example_loss  # noqa: E402
from advalign_jax.attacks.search import (REFERENCE_ATTACK, ReferenceSearch, attacks_per_image,  # noqa: E402
                                         forward_equivalents_per_image, reference_search)
from advalign_jax.models import get_model  # noqa: E402
from minimal_eps_search import forward_flops, measured_peak_flops  # noqa: E402


def programs(model, variables, x, y):
    """name -> a zero-argument function running one compiled program on the batch (blocking)."""
    logits_fn = lambda v, xx: model.apply(v, xx)  # noqa: E731
    unrolled_cfg = dataclasses.replace(REFERENCE_ATTACK, unroll=True)
    looped_cfg = dataclasses.replace(REFERENCE_ATTACK, unroll=False)
    search = jax.jit(lambda v, xx, yy: reference_search(lambda z: logits_fn(v, z), xx, yy, attack=looped_cfg)["eps"])
    search_unrolled = jax.jit(lambda v, xx, yy: reference_search(lambda z: logits_fn(v, z), xx, yy,
                                                                 attack=unrolled_cfg)["eps"])
    w = jax.random.normal(jax.random.PRNGKey(1), (x.shape[-1], model.num_classes))
    cheap = jax.jit(lambda xx, yy: reference_search(lambda z: jnp.mean(z, axis=(1, 2)) @ w * 50.0, xx, yy,
                                                    attack=looped_cfg)["eps"])

    def grad_fn(v, xx, yy):
        per, vjp = jax.vjp(lambda z: per_example_loss(logits_fn(v, z), yy), xx)
        return vjp(jnp.ones_like(per))[0]

    grad = jax.jit(grad_fn)
    fwd = jax.jit(logits_fn)
    n_attacks = attacks_per_image(ReferenceSearch())
    n_grad, n_fwd = n_attacks * REFERENCE_ATTACK.steps, n_attacks + 1

    def model_only():
        out = None
        for _ in range(n_grad):
            out = grad(variables, x, y)
        for _ in range(n_fwd):
            out = fwd(variables, x)
        return out

    return {
        "search, PGD steps as a loop": lambda: search(variables, x, y),
        "search, unrolled PGD steps": lambda: search_unrolled(variables, x, y),
        "model only": model_only,
        "attack only": lambda: cheap(x, y),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = get_model(args.model, num_classes=10 if args.model == "small_cnn" else 1000, input_size=args.size)
    variables = dict(model.init(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (args.batch, args.size, args.size, 3)).astype(np.float32))
    y = jnp.argmax(model.apply(variables, x), axis=1)  # correctly classified: every image runs the protocol
    progs = programs(model, variables, x, y)
    compile_s = {}
    for name, run in progs.items():
        t = time.perf_counter()
        jax.block_until_ready(run())
        compile_s[name] = time.perf_counter() - t
    times = {name: [] for name in progs}
    for _ in range(args.rounds):
        for name, run in progs.items():
            t = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - t)
    flops = forward_flops(model, variables, args.size)
    peak = measured_peak_flops()
    floor = forward_equivalents_per_image() * flops * args.batch / peak
    full = statistics.median(times["search, PGD steps as a loop"])
    print(f"{args.model} at {args.size} px, batch {args.batch}: {flops / 1e9:.3f} GFLOP per forward, "
          f"measured peak {peak / 1e9:.0f} GFLOP/s, {forward_equivalents_per_image()} forward-equivalents "
          f"per image; {jax.devices()[0].device_kind}")
    print("\n| program | ms per image (median of rounds) | share of the looped search | fraction of the floor | "
          "first call (compile + run) s |")
    print("|---|---|---|---|---|")
    print(f"| arithmetic floor | {1e3 * floor / args.batch:.2f} | {floor / full:.2f} | 1.00 | |")
    for name in progs:
        med = statistics.median(times[name])
        frac = f"{floor / med:.2f}" if name != "attack only" else "-"
        print(f"| {name} | {1e3 * med / args.batch:.2f} | {med / full:.2f} | {frac} | {compile_s[name]:.1f} |")


if __name__ == "__main__":
    main()
