"""The unit-sensitivity search (:func:`advalign_jax.evaluation.sensitivity.optimize.item_sensitivity`)
against the same procedure in PyTorch written one image at a time, and against its arithmetic floor,
on the same model, weights, images and random starts, in one run on the same machine.

    python benchmarks/sensitivity.py [--model small_cnn] [--size 32] [--items 4] [--restarts 4]
                                     [--steps 10] [--repeats 5] [--threads N] [--no-torch]

The workload: ``--items`` (image, unit, eps) items of a small model's penultimate units
(``model.intermediates(variables, images)['features']``, an (N, D) vector; the units are its entries),
the items ordered unit-major over ``--images`` random images (item ``k``: the ``k // images``-th unit,
image ``k % images``; the units of the largest mean response, so that none is dead), one eps. Each
item is ``2 x restarts`` runs (both signs, the same start for the two signs of a restart); each run is
two phases (the ball of ``2 eps``, then ``eps``), each phase ``1 + steps`` forward-backward passes (its
starting point, then ``steps`` candidates). So a batch costs ``runs x 2 (1 + steps)``
forward-backward passes, plus one forward pass of every run at the end (the response reached) and one
of every item's clean image. Models: ``small_cnn`` (the zoo's small CNN,
stem patch ``size / 16``, widths 24-32-64-96: three 3x3 conv + BatchNorm stages) at ``--size`` px, or
``cifar_resnet18`` (PAG's CIFAR ResNet-18, 32 px).

Methods (the table's rows):

- ``ours``: ``jax.jit`` of ``item_sensitivity`` over the whole batch (``items x 2 restarts`` runs in
  one program, the model called once per pass on every run);
- ``PyTorch, loop``: how a study without batching runs it: for each unit, each image, each sign and
  restart, the same procedure (the same starts, step, projection, clipping and annealing) on ONE
  image (batch 1) in eager PyTorch, ``autograd.grad`` per pass, ``.item()`` for each accept/reject;
- ``PyTorch, batched``: the same procedure with all runs of the batch as one torch batch (the
  accept/reject per run with ``torch.where``): the gap between the two PyTorch rows is what batching
  buys; the gap between it and ours is XLA against eager PyTorch.

PyTorch holds the same architecture with the same weights: for ``small_cnn`` a ``torch.nn`` twin
written here, its weights copied from the flax variables (BatchNorm statistics and affine parameters
randomised first, so that they matter); for ``cifar_resnet18`` the test reference module
(``tests/references/torch_cifar.py``, random weights) imported through our converter. The features and
logits of both are compared once at the start (float32, to 1e-4) and the check is printed; so is the
largest difference of the sensitivities the three methods return (the same starts; a near-tie in an
accept/reject may still send a run another way).

Threads: XLA:CPU runs its intra-op thread pool on every CPU the process may use
(``os.sched_getaffinity``); PyTorch is given the same number (``--threads`` overrides it), so both
frameworks have the same cores. PyTorch's OpenMP threads spin-wait between operations by default, and
on cores shared with other work a spinning thread waits for a descheduled peer: on the loaded 2-core
development machine that made one forward-backward pass of the small CNN at batch 1 about 45 ms on 2
threads against 1.2 ms on 1 (2.1 ms on 2 passive threads). XLA's pool does not wait that way, so the
benchmark sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (the header prints the
policy); ``--threads 1`` is the other fair setting on a busy machine.

The table: per method its time for the batch, runs/s, and ``ratio vs ours`` (its time over ours:
above 1 it is slower than ours).

Timing: every method is warmed up first (ours: compiled, the compile time reported on its own line,
then called once; PyTorch: one call), then ``--repeats`` rounds call each method once in turn (so a
change of the machine's load falls on all alike); the table gives the median of the rounds, and the
ratio to ours the median of the per-round ratios.

The floor: the measured time of one forward-backward pass of the model on a batch of the same size
(``items x 2 restarts`` images; ``jit`` of the input-gradient of the sum of the runs' unit responses)
times the number of passes the procedure needs (``2 (1 + steps)``), plus the measured forward pass of
the ``items x 2 restarts`` final points and of the ``items`` clean images: what the search would cost
if it were nothing but its model passes. ``ours / floor`` is printed under the table, with the same
pass timed inside a ``lax.fori_loop`` of ``steps`` iterations (how the search's phases run their
candidates): on XLA:CPU a pass inside a loop costs several times one called alone, which is most of
the distance from ours to the floor there.
"""

import argparse
import math
import os
import sys
import tempfile
import time

# PyTorch's OpenMP threads spin-wait between operations by default; on cores shared with other work a
# spinning thread waits for a descheduled peer (the module docstring). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "references"))
sys.path.insert(0, os.path.dirname(__file__))

from timing import ratio_summary  # noqa: E402  (benchmarks/timing.py)

from advalign_jax.evaluation.sensitivity.optimize import (  # noqa: E402
    SearchConfig, item_sensitivity, run_grid, uniform_ball)
from advalign_jax.models import get_model  # noqa: E402
from advalign_jax.models.base import get_norm  # noqa: E402

MODELS = ("small_cnn", "cifar_resnet18")
WIDTHS = (24, 32, 64, 96)
NUM_CLASSES = 10
TINY = 1e-30
CHECK_TOL = 1e-4


# ---------------------------------------------------------------------------------------------- models


def _randomise_small_cnn(variables, seed=0):
    """BatchNorm statistics and affine parameters and the head's bias away from their 0/1 defaults."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    for name in stats:
        c = stats[name]["bn"]["mean"].shape
        params[name]["bn"]["scale"] = (rng.uniform(size=c) + 0.5).astype(np.float32)
        params[name]["bn"]["bias"] = (0.2 * rng.normal(size=c)).astype(np.float32)
        stats[name]["bn"]["mean"] = (0.2 * rng.normal(size=c)).astype(np.float32)
        stats[name]["bn"]["var"] = (rng.uniform(size=c) + 0.5).astype(np.float32)
    params["head"]["bias"] = (0.2 * rng.normal(size=params["head"]["bias"].shape)).astype(np.float32)
    return {"params": jax.tree.map(jnp.asarray, params), "batch_stats": jax.tree.map(jnp.asarray, stats)}


def _torch_normaliser(norm):
    """``x -> (channels(x) * scale - mean) / std`` on NCHW tensors (the model's own InputNorm)."""
    import torch  # optional: the reference side

    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)

    def normalise(x):
        if norm.bgr:
            x = x.flip(1)
        return (x * norm.scale - mean) / std

    return normalise


def torch_small_cnn(model, variables):
    """A ``torch.nn`` twin of the zoo's ``small_cnn`` (NCHW input in [0, 1]) with the flax weights."""
    import torch  # optional: the reference side
    from torch import nn

    widths, patch = tuple(model.options["widths"]), int(model.options["patch"])
    normalise = _torch_normaliser(get_norm(model.options["norm"]))

    class TorchSmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, widths[0], patch, stride=patch)
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False)
                                       for a, b in zip(widths[:-1], widths[1:]))
            self.bns = nn.ModuleList(nn.BatchNorm2d(b, eps=1e-5) for b in widths[1:])
            self.head = nn.Linear(widths[-1], model.num_classes)

        def features(self, x):
            x = torch.relu(self.stem(normalise(x)))
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
                x = torch.relu(bn(conv(x)))
                if i < len(widths) - 2:
                    x = torch.nn.functional.max_pool2d(x, 2)
            return x.mean(dim=(2, 3))

        def logits(self, x):
            return self.head(self.features(x))

    net = TorchSmallCNN().eval()
    p, s = variables["params"], variables["batch_stats"]

    def t(a, *perm):
        a = np.asarray(a, np.float32)
        return torch.from_numpy(np.array(a.transpose(*perm) if perm else a, np.float32))

    with torch.no_grad():
        net.stem.weight.copy_(t(p["stem"]["kernel"], 3, 2, 0, 1))  # (p, p, C, F) -> (F, C, p, p)
        net.stem.bias.copy_(t(p["stem"]["bias"]))
        for i, (conv, bn) in enumerate(zip(net.convs, net.bns)):
            name = f"stage{i + 1}"
            conv.weight.copy_(t(p[name]["conv"]["kernel"], 3, 2, 0, 1))
            bn.weight.copy_(t(p[name]["bn"]["scale"]))
            bn.bias.copy_(t(p[name]["bn"]["bias"]))
            bn.running_mean.copy_(t(s[name]["bn"]["mean"]))
            bn.running_var.copy_(t(s[name]["bn"]["var"]))
        net.head.weight.copy_(t(p["head"]["kernel"], 1, 0))
        net.head.bias.copy_(t(p["head"]["bias"]))
    return net


def torch_cifar_resnet18(inner, model):
    """The reference CIFAR ResNet-18 behind the model's input normalisation, with a ``features`` view."""
    from torch import nn

    normalise = _torch_normaliser(get_norm(model.options["norm"]))
    last = f"layer{inner.num_stages}_out"

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def features(self, x):
            return self.inner(normalise(x))[1][last].mean(dim=(2, 3))

        def logits(self, x):
            return self.inner(normalise(x))[0]

    return Wrapped().eval()


def build(name: str, size: int, want_torch: bool, seed: int = 0):
    """``(model, variables, torch twin or None)``, the same weights on both sides."""
    torch_ok = want_torch
    try:
        import torch  # optional: the reference side  # noqa: F401
    except ImportError:
        torch_ok = False
    if name == "small_cnn":
        if size % 16:
            raise SystemExit(f"--size {size}: small_cnn needs a multiple of 16 (stem patch size / 16)")
        model = get_model("small_cnn", num_classes=NUM_CLASSES, widths=WIDTHS, patch=size // 16, input_size=size)
        variables = _randomise_small_cnn(model.init(jax.random.PRNGKey(seed)), seed)
        return model, variables, (torch_small_cnn(model, variables) if torch_ok else None)
    if not torch_ok:
        model = get_model("cifar_resnet18", num_classes=NUM_CLASSES)
        return model, dict(model.init(jax.random.PRNGKey(seed))), None
    import torch  # optional: the reference side

    import torch_cifar  # the reference PyTorch module (tests/references/)

    from advalign_jax.models.checkpoint import load_model
    from advalign_jax.models.convert import convert

    inner = torch_cifar.randomise(torch_cifar.TorchCifarResNet(), seed=seed).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(inner.state_dict(), os.path.join(tmp, "w.pth"))
        convert(os.path.join(tmp, "w.pth"), "cifar_resnet18", os.path.join(tmp, "ours"))
        model, variables = load_model(os.path.join(tmp, "ours"))
    return model, variables, torch_cifar_resnet18(inner, model)


def check_twin(model, variables, net, x) -> str:
    """One line: the largest |difference| of the features and of the logits, PyTorch vs ours."""
    import torch  # optional: the reference side

    ours_f = np.asarray(model.intermediates(variables, jnp.asarray(x))["features"])
    ours_l = np.asarray(model.apply(variables, jnp.asarray(x)))
    with torch.no_grad():
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        theirs_f, theirs_l = net.features(tx).numpy(), net.logits(tx).numpy()
    df, dl = float(np.abs(ours_f - theirs_f).max()), float(np.abs(ours_l - theirs_l).max())
    ok = np.allclose(theirs_f, ours_f, atol=CHECK_TOL, rtol=CHECK_TOL) and np.allclose(
        theirs_l, ours_l, atol=CHECK_TOL, rtol=CHECK_TOL)
    line = (f"PyTorch twin vs ours on {len(x)} images (float32): features max |diff| {df:.1e} (scale "
            f"{np.abs(ours_f).max():.2f}), logits max |diff| {dl:.1e}: {'match' if ok else 'MISMATCH'} "
            f"to {CHECK_TOL:g}")
    if not ok:
        raise SystemExit(line)
    return line


# ---------------------------------------------------------------------------------------------- the workload


def workload(model, variables, args, seed=0):
    """``(images (I, H, W, 3), x (B, ...), unit (B,), eps (B,), key (B, 2), starts (B, 2R, ...))``.

    The units: the ``ceil(items / images)`` units of the largest mean response over the images (a
    random network has dead penultimate units, whose sensitivity is 0 and whose gradient is 0).

    ``starts``: each run's first-phase starting point as ``item_sensitivity`` draws it (restart ``k`` of
    item ``b`` from ``fold_in(key_b, k)``, uniform in the ball of ``wide x eps``), for the PyTorch side."""
    rng = np.random.default_rng(seed)
    size = model.input_size
    images = rng.uniform(size=(args.images, size, size, 3)).astype(np.float32)
    b = args.items
    item = np.arange(b)
    clean = np.asarray(jax.jit(lambda v, z: model.intermediates(v, z)["features"])(variables, jnp.asarray(images)))
    chosen = np.argsort(-clean.mean(axis=0), kind="stable")[:-(-b // args.images)]
    unit, image = chosen[item // args.images], item % args.images
    x = images[image]
    eps = np.full(b, args.eps, np.float32)
    key = jax.random.split(jax.random.PRNGKey(seed), b)
    _, restart = run_grid(args.restarts)

    def starts_of(k, e):
        keys = jax.vmap(lambda i: jax.random.fold_in(k, i))(restart)
        return jax.vmap(lambda kk: uniform_ball(kk, (1,) + x.shape[1:], (e * args.wide)[None], jnp.float32)[0])(keys)

    starts = np.asarray(jax.vmap(starts_of)(key, jnp.asarray(eps)))
    return images, x, unit.astype(np.int32), eps, key, starts


def ours_fn(model, config):
    def search(variables, x, unit, eps, key):
        def response(images):
            return model.intermediates(variables, images)["features"]

        return item_sensitivity(response, x, unit, eps, key, config)

    return search


def floor_fns(model):
    """The floor's pieces: one forward-backward pass (the input-gradient of the sum of the runs' unit
    responses) and one forward pass, each ``jit``-ed."""
    def features(v, x):
        return model.intermediates(v, x)["features"]

    def fwd_bwd(v, x, unit):
        return jax.grad(lambda z: jnp.sum(jnp.take_along_axis(features(v, z), unit[:, None], axis=1)))(x)

    def fwd(v, x, unit):
        return jnp.take_along_axis(features(v, x), unit[:, None], axis=1)[:, 0]

    return fwd_bwd, fwd


def looped_pass_fn(fwd_bwd, steps: int):
    """``steps`` forward-backward passes inside a ``lax.fori_loop`` (each from the last one's point), as
    the search's phases run them: what a pass costs inside a loop on this backend."""
    def looped(v, x, unit):
        return jax.lax.fori_loop(0, steps, lambda _, d: d + 1e-3 * fwd_bwd(v, x + d, unit), jnp.zeros_like(x))

    return looped


# ---------------------------------------------------------------------------------------------- PyTorch


def torch_methods(net, args, x, unit, eps, starts):
    """``(loop(limit=None), batched())``: the procedure in eager PyTorch, one image at a time and as one
    batch of every run; each returns the items' sensitivities (B,) as NumPy."""
    import torch  # optional: the reference side

    r, steps, wide, decay = args.restarts, args.steps, args.wide, args.decay
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tstarts = torch.from_numpy(starts.transpose(0, 1, 4, 2, 3).copy())  # (B, 2R, C, H, W)
    signs = [1.0] * r + [-1.0] * r

    # ---- the straightforward loop: one run of one image at a time
    def keep_valid1(xb, d):
        return (xb + d).clamp(0.0, 1.0) - xb

    def project1(d, radius):
        return d * min(1.0, radius / max(float(d.norm()), TINY))

    def evaluate1(xb, u, clean, sign, d):
        z = (xb + d).requires_grad_(True)
        value = sign * (net.features(z)[0, u] - clean)
        (grad,) = torch.autograd.grad(value, [z])
        return float(value.detach()), grad

    def phase1(xb, u, clean, e, sign, d, radius):
        best_d = keep_valid1(xb, project1(d, radius))
        best_v, best_g = evaluate1(xb, u, clean, sign, best_d)
        alpha = e
        for _ in range(steps):
            norm = float(best_g.norm())
            step = best_g / max(norm, TINY) if norm > 0 else torch.zeros_like(best_g)
            cand = keep_valid1(xb, project1(best_d + alpha * step, radius))
            v, g = evaluate1(xb, u, clean, sign, cand)
            if v > best_v:
                best_d, best_v, best_g = cand, v, g
            else:
                alpha *= decay
        return best_d, best_v

    def loop(limit=None):
        out = []
        for b in range(len(x) if limit is None else limit):  # items are unit-major: for each unit, each image
            xb, u, e = tx[b:b + 1], int(unit[b]), float(eps[b])
            with torch.no_grad():
                clean = float(net.features(xb)[0, u])
            best_v, best_d = -math.inf, None
            for k, sign in enumerate(signs):  # for each sign, for each restart
                d = tstarts[b, k:k + 1]
                if wide > 1:
                    d, _ = phase1(xb, u, clean, e, sign, d, wide * e)
                d, v = phase1(xb, u, clean, e, sign, d, e)
                if v > best_v:
                    best_v, best_d = v, d
            with torch.no_grad():  # the response reached at the winning point
                float(net.features(xb + best_d)[0, u])
            out.append(max(0.0, best_v))
        return np.asarray(out)

    # ---- the same procedure with every run of the batch in one torch batch
    n = len(x) * 2 * r
    xs = tx.repeat_interleave(2 * r, dim=0)
    units = torch.from_numpy(np.repeat(unit, 2 * r).astype(np.int64))[:, None]
    run_sign = torch.tensor(signs * len(x))
    run_eps = torch.from_numpy(np.repeat(eps, 2 * r))
    d0 = tstarts.reshape(n, *tstarts.shape[2:])

    def col(v):
        return v.view(-1, 1, 1, 1)

    def norms(v):
        return col(v.flatten(1).norm(dim=1))

    def batched():
        with torch.no_grad():
            clean = net.features(tx).gather(1, torch.from_numpy(unit.astype(np.int64))[:, None])[:, 0]
        clean = clean.repeat_interleave(2 * r)

        def keep_valid(d):
            return (xs + d).clamp(0.0, 1.0) - xs

        def project(d, radius):
            return d * torch.clamp(col(radius) / norms(d).clamp_min(TINY), max=1.0)

        def evaluate(d):
            z = (xs + d).requires_grad_(True)
            value = run_sign * (net.features(z).gather(1, units)[:, 0] - clean)
            (grad,) = torch.autograd.grad(value.sum(), [z])
            return value.detach(), grad

        def phase(d, radius):
            best_d = keep_valid(project(d, radius))
            best_v, best_g = evaluate(best_d)
            alpha = run_eps.clone()
            for _ in range(steps):
                gn = norms(best_g)
                step = torch.where(gn > 0, best_g / gn.clamp_min(TINY), torch.zeros_like(best_g))
                cand = keep_valid(project(best_d + col(alpha) * step, radius))
                v, g = evaluate(cand)
                better = v > best_v
                best_d = torch.where(col(better), cand, best_d)
                best_g = torch.where(col(better), g, best_g)
                best_v = torch.where(better, v, best_v)
                alpha = torch.where(better, alpha, alpha * decay)
            return best_d, best_v

        d = d0
        if wide > 1:
            d, _ = phase(d, wide * run_eps)
        d, v = phase(d, run_eps)
        with torch.no_grad():  # the response reached at every run's point
            net.features(xs + d).gather(1, units)
        return v.view(len(x), 2 * r).max(dim=1).values.clamp_min(0.0).numpy()

    return loop, batched


# ---------------------------------------------------------------------------------------------- main


def passes_per_run(config: SearchConfig) -> int:
    """Forward-backward passes of one run: ``1 + steps`` per phase, two phases when ``wide > 1``."""
    return (2 if config.wide > 1 else 1) * (1 + int(config.steps))


def jax_threads() -> int:
    """The CPUs this process may run on: the size of XLA:CPU's intra-op thread pool."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small_cnn", choices=MODELS)
    p.add_argument("--size", type=int, default=32,
                   help="image side for small_cnn (a multiple of 16; default 32); cifar_resnet18 is 32 px")
    p.add_argument("--items", type=int, default=4, help="(image, unit, eps) items in the batch (default 4)")
    p.add_argument("--images", type=int, default=2, help="distinct images the items cycle over (default 2)")
    p.add_argument("--restarts", type=int, default=4, help="random starts per sign (default 4; the study: 100)")
    p.add_argument("--steps", type=int, default=10, help="candidates per phase (default 10; the study: 20)")
    p.add_argument("--eps", type=float, default=0.5, help="L2 radius in [0, 1] pixel units (default 0.5)")
    p.add_argument("--wide", type=float, default=2.0, help="first phase's radius / eps (default 2)")
    p.add_argument("--decay", type=float, default=0.9, help="step factor after no progress (default 0.9)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch threads (default: as many as XLA:CPU uses, the CPUs this process may use)")
    p.add_argument("--no-torch", action="store_true", help="only ours and the floor")
    args = p.parse_args(argv)
    if args.items < 1 or args.images < 1 or args.repeats < 1:
        p.error("--items, --images and --repeats must be positive")

    model, variables, net = build(args.model, args.size, not args.no_torch)
    d = int(jax.eval_shape(lambda v, z: model.intermediates(v, z)["features"], variables,
                           model.dummy_input(1)).shape[1])
    if -(-args.items // args.images) > d:
        p.error(f"--items {args.items} over --images {args.images} needs more than the model's {d} units")
    config = SearchConfig(restarts=args.restarts, steps=args.steps, wide=args.wide, decay=args.decay,
                          start="random", clip=(0.0, 1.0))
    images, x, unit, eps, key, starts = workload(model, variables, args)
    b, runs = args.items, args.items * 2 * args.restarts
    per_run = passes_per_run(config)

    threads = args.threads or jax_threads()
    notes = []
    if net is not None:
        import torch  # optional: the reference side

        torch.set_num_threads(threads)
        notes.append(check_twin(model, variables, net, images))

    # ours: compiled once (the compile time reported apart), then called once before the rounds
    jx, ju, je, jk = jnp.asarray(x), jnp.asarray(unit), jnp.asarray(eps), jnp.asarray(key)
    start = time.perf_counter()
    ours_c = jax.jit(ours_fn(model, config)).lower(variables, jx, ju, je, jk).compile()
    compile_s = time.perf_counter() - start
    fb, fwd = floor_fns(model)
    xs = jnp.repeat(jx, 2 * args.restarts, axis=0)
    us = jnp.repeat(ju, 2 * args.restarts)
    start = time.perf_counter()
    fb_c = jax.jit(fb).lower(variables, xs, us).compile()
    fwd_c = jax.jit(fwd).lower(variables, xs, us).compile()
    fwd1_c = jax.jit(fwd).lower(variables, jx, ju).compile()
    looped_c = jax.jit(looped_pass_fn(fb, args.steps)).lower(variables, xs, us).compile()
    floor_compile_s = time.perf_counter() - start
    results = {}

    def ours():
        results["ours"] = np.asarray(jax.block_until_ready(ours_c(variables, jx, ju, je, jk))["sensitivity"])

    fns = {"ours": ours,
           "pass": lambda: jax.block_until_ready(fb_c(variables, xs, us)),
           "forward": lambda: jax.block_until_ready(fwd_c(variables, xs, us)),
           "clean forward": lambda: jax.block_until_ready(fwd1_c(variables, jx, ju)),
           "looped": lambda: jax.block_until_ready(looped_c(variables, xs, us))}
    warm = {name: fn for name, fn in fns.items()}
    if net is not None:
        loop, batched = torch_methods(net, args, x, unit, eps, starts)

        def torch_loop():
            results["loop"] = loop()

        def torch_batched():
            results["batched"] = batched()

        fns.update({"loop": torch_loop, "batched": torch_batched})
        warm.update({"loop": lambda: loop(limit=1), "batched": torch_batched})  # the loop: one item warms it
    for fn in warm.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: float(np.median(t)) for name, t in times.items()}
    floor_rounds = [per_run * a + f + c for a, f, c in zip(times["pass"], times["forward"], times["clean forward"])]
    floor = float(np.median(floor_rounds))

    size = images.shape[1]
    device = jax.devices()[0].device_kind
    header = (f"# unit sensitivity, {args.model} {size}px float32, {d} penultimate units, {b} items "
              f"({args.images} images) x {2 * args.restarts} runs each (R = {args.restarts}), {args.steps} steps "
              f"per phase, eps {args.eps:g}; {device}, {os.cpu_count()} CPU cores, 1-minute load "
              f"{os.getloadavg()[0]:.1f}; jax {jax.__version__}")
    if net is not None:
        n = torch.get_num_threads()
        header += (f", torch {torch.__version__} ({n} thread{'s' if n != 1 else ''}, "
                   f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')})")
    print(header + f"; median of {args.repeats} interleaved rounds")
    for line in notes:
        print(line)
    print("| method | items | runs | batch | passes | seconds | runs/s | ratio vs ours |")
    print("|---|---|---|---|---|---|---|---|")
    passes = runs * per_run

    def row(label, name, batch):
        if name == "ours":
            ratio = "1.00"
        else:
            r_med, r_lo, r_hi = ratio_summary(times[name], times["ours"])
            ratio = f"{r_med:.2f} [{r_lo:.2f}, {r_hi:.2f}]"
        print(f"| {label} | {b} | {runs} | {batch} | {passes} | {med[name]:.3f} | {runs / med[name]:.1f} | "
              f"{ratio} |")

    row("ours (jit of item_sensitivity, one program)", "ours", runs)
    if net is not None:
        row("PyTorch, batched (every run in one batch)", "batched", runs)
        row("PyTorch, loop (unit, image, sign, restart; batch 1)", "loop", 1)
    f_med, f_lo, f_hi = ratio_summary(floor_rounds, times["ours"])
    print(f"| floor: {per_run} x one forward-backward pass at batch {runs} + the forwards | {b} | {runs} | {runs} | "
          f"{passes} | {floor:.3f} | {runs / floor:.1f} | {f_med:.2f} [{f_lo:.2f}, {f_hi:.2f}] |")
    phases = 2 if config.wide > 1 else 1
    print(f"passes: forward-backward passes of the batch ({runs} runs x {per_run} = {phases} phase(s) x "
          f"(1 + {args.steps})); besides, every method runs a forward of each item's clean image, and ours and "
          f"PyTorch batched one of every run's final point (the loop: of each item's winning point)")
    print(f"floor pieces (median): one forward-backward pass at batch {runs} {med['pass'] * 1e3:.2f} ms, its forward "
          f"{med['forward'] * 1e3:.2f} ms, the clean forward at batch {b} {med['clean forward'] * 1e3:.2f} ms; "
          f"the same pass inside a lax.fori_loop of {args.steps} iterations (as the search's phases run it) "
          f"{med['looped'] / args.steps * 1e3:.2f} ms per iteration")
    o_med, o_lo, o_hi = ratio_summary(times["ours"], floor_rounds)
    print(f"ours / floor: {o_med:.2f} [{o_lo:.2f}, {o_hi:.2f}]; compile: ours {compile_s:.1f} s, the floor's "
          f"programs {floor_compile_s:.1f} s (excluded from the times)")
    if net is not None:
        diffs = [float(np.abs(results[k] - results["ours"]).max()) for k in ("batched", "loop")]
        print(f"sensitivities (the same starts): ours mean {results['ours'].mean():.4f}; largest |difference| to "
              f"PyTorch batched {diffs[0]:.1e}, to the PyTorch loop {diffs[1]:.1e}")


if __name__ == "__main__":
    main()
