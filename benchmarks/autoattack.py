"""AutoAttack stage by stage: our compiled attacks vs torchattacks 3.5.1 on the same CIFAR-size model.

    python benchmarks/autoattack.py [--images 32] [--eps 0.0005] [--repeats 1] [--n-iter 100] [--queries 5000]

(``--queries 1000`` keeps a CPU run to minutes: Square's time per query does not depend on the budget.)

A small CNN (``small_cnn``, widths 32-64-128, 32x32x3 inputs, random weights) and its PyTorch copy
(the same logits); the same images, every one correctly classified (labels = the model's
predictions). Each of AutoAttack "standard"'s attacks runs on the whole batch, with AutoAttack's
budgets: APGD-CE (100 iterations), APGD-T (9 targets x 100), FAB-T (9 targets x 100), Square (5,000
queries, schedule not rescaled), as :func:`advalign_jax.attacks.autoattack.run_stage` (one compiled
function per stage) and as torchattacks' ``APGD``, ``APGDT``, ``FAB(multi_targeted=True)`` and
``Square(resc_schedule=False)`` (eager PyTorch). The radius is small (default 0.0005, about 1/8 of a
grey level), so that nearly every point survives every stage and each attack makes its full number of
iterations: the cost of attacking a robust model, where AutoAttack spends its time.

Timing rule (``benchmarks/timing.py``): one warm-up call (our compilation), then the best of
``repeats``. PyTorch runs with the faster of one thread and all cores (``--torch-threads``). Printed per stage: images/s of each, the ratio ours / torchattacks, and the points each
broke (they should agree up to the two implementations' random draws).
"""

import argparse
import os
import sys

import jax
import numpy as np

from advalign_jax.attacks import autoattack as AA
from advalign_jax.models import get_model
from minimal_eps_search import torch_copy  # benchmarks/minimal_eps_search.py
from timing import best_time  # benchmarks/timing.py


def their_attacks(torchattacks, net, eps, n_iter, queries, n_classes):
    return {"apgd-ce": torchattacks.APGD(net, norm="Linf", eps=eps, steps=n_iter, n_restarts=1, loss="ce"),
            "apgd-t": torchattacks.APGDT(net, norm="Linf", eps=eps, steps=n_iter, n_restarts=1, n_classes=n_classes),
            "fab-t": torchattacks.FAB(net, norm="Linf", eps=eps, steps=n_iter, multi_targeted=True,
                                      n_classes=n_classes),
            "square": torchattacks.Square(net, norm="Linf", eps=eps, n_queries=queries, resc_schedule=False)}


def torch_threads(torch, net, xt, asked: int) -> int:
    """PyTorch's thread count: ``asked``, or (0) the faster of 1 and every core on this batch's forward
    pass (on a busy machine OpenMP's waiting threads can make several threads 10x slower than one)."""
    if asked > 0:
        torch.set_num_threads(asked)
        return asked
    best = {}
    for n in sorted({1, os.cpu_count()}):
        torch.set_num_threads(n)
        with torch.no_grad():
            best[n] = best_time(lambda: net(xt), 3)
    chosen = min(best, key=best.get)
    torch.set_num_threads(chosen)
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--eps", type=float, default=0.0005)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--n-iter", type=int, default=100, help="APGD and FAB iterations")
    parser.add_argument("--queries", type=int, default=5000, help="Square's budget")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: the faster of 1 and all cores")
    args = parser.parse_args()

    import torch  # pylint: disable=import-outside-toplevel
    import torchattacks  # pylint: disable=import-outside-toplevel

    model = get_model("small_cnn", num_classes=10, widths=(32, 64, 128), patch=2, input_size=32)
    variables = dict(model.init(jax.random.PRNGKey(0)))
    net = torch_copy("small_cnn", model, variables)
    f = model.logits_fn(variables)
    x = np.random.default_rng(0).uniform(0, 1, size=(args.images, 32, 32, 3)).astype(np.float32)
    logits = np.asarray(f(x))
    y = logits.argmax(1)  # every point starts correctly classified
    xt, yt = torch.tensor(x.transpose(0, 3, 1, 2).copy()), torch.tensor(y)
    threads = torch_threads(torch, net, xt, args.torch_threads)
    with torch.no_grad():
        match = float(np.abs(net(xt).numpy() - logits).max() / np.abs(logits).max())
    stages = AA.version_stages("standard", "linf", n_iter=args.n_iter, n_queries=args.queries)
    theirs = their_attacks(torchattacks, net, args.eps, args.n_iter, args.queries, 10)

    rows = []
    for s, (name, cfg) in enumerate(stages):
        run = jax.jit(lambda x, y, cfg=cfg, s=s: AA.run_stage(f, x, y, args.eps, cfg, jax.random.fold_in(
            jax.random.PRNGKey(0), s)))
        out = {}

        def ours(run=run, out=out):
            out["ok"] = np.asarray(jax.block_until_ready(run(x, y))[1])

        def reference(atk=theirs[name], out=out):
            adv = atk(xt, yt)
            with torch.no_grad():
                out["ref"] = net(adv).argmax(1).numpy() != y

        t_ours = best_time(ours, args.repeats)
        t_ref = best_time(reference, args.repeats)
        rows.append((name, args.images / t_ours, args.images / t_ref, t_ref / t_ours, int(out["ok"].sum()),
                     int(out["ref"].sum())))
        print(f"{name}: ours {t_ours:.2f} s, torchattacks {t_ref:.2f} s", file=sys.stderr)

    print(f"AutoAttack standard stages, Linf eps {args.eps:g}, {args.images} images 32x32x3, small_cnn "
          f"(widths 32-64-128), {os.cpu_count()} CPU cores (PyTorch: {threads} thread(s)), best of {args.repeats} "
          f"after a warm-up; logits match {match:.1e}")
    print("| stage | budget | ours img/s | torchattacks img/s | ours / torchattacks | broken: ours | broken: torchattacks |")
    print("|---|---|---|---|---|---|---|")
    budgets = {"apgd-ce": f"{args.n_iter} it", "apgd-t": f"9 x {args.n_iter} it", "fab-t": f"9 x {args.n_iter} it",
               "square": f"{args.queries} queries"}
    for name, ours_ips, ref_ips, ratio, ok, ref_ok in rows:
        print(f"| {name} | {budgets[name]} | {ours_ips:.2f} | {ref_ips:.2f} | {ratio:.1f}x | {ok} | {ref_ok} |")
    ours_s = sum(args.images / r[1] for r in rows)
    ref_s = sum(args.images / r[2] for r in rows)
    print(f"| all four | | {args.images / ours_s:.2f} | {args.images / ref_s:.2f} | {ref_s / ours_s:.1f}x | | |")


if __name__ == "__main__":
    main()
