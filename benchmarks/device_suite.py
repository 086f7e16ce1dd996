"""One command that measures the project's heavy paths on whatever device JAX sees, as a Markdown table.

    python benchmarks/device_suite.py [--smoke] [--out results/device_suite.md] [--images 1000] [--no-torch]
                                      [--parts eps train pag adversarial attacks sensitivity]

Rows (each timed after one warm-up call that compiles it; compile time is reported separately; the
timing rule of ``benchmarks/timing.py``, ``jax.block_until_ready`` on every result):

- ``minimal-eps search``: the project's protocol (:func:`advalign_jax.attacks.search.reference_search`:
  the eps = 10 gate, the eps = 1 split and the bisection, 3-step L2 PGD each) on ``--images`` images
  with ResNet-50 (224 px, 1000 classes) in float32 and in bfloat16, in batches of ``--eps-batch``. The
  arithmetic floor: (forward + backward FLOPs of one image, XLA's count) x (gradient evaluations per
  image) + forward FLOPs x (forward-only evaluations), over the device's peak FLOP/s where this
  script knows it (:data:`PEAK_FLOPS`; float32 at the TF32 rate, XLA's default precision on these
  GPUs), else the FLOP count alone. Goal: under 10 s for 1,000 images on an H100.
- ``CE step`` and ``harmonizer step`` of ResNet50V2 (224 px), with and without ``remat`` (the model
  option wrapping every block in ``jax.checkpoint``), the harmonizer without remat in both orders of
  differentiation: images/s, XLA's temporary memory of the compiled step and the device's peak
  memory so far (``jax.devices()[0].memory_stats()``, where the backend reports it).
- ``PAG step`` of PAG's CIFAR ResNet-18 (32 px) at K = 1 and K = 10 target classes, both orders, and
  the plain CE step; beside it the official PyTorch formulation (``tests/references/torch_pag_reference.py``)
  when PyTorch sees the same kind of device (skipped otherwise, or with ``--no-torch``).
- ``PGD-AT step`` (the ``adversarial`` objective: L2 eps 0.5, 7 steps of eps / 5) and ``TRADES step``
  (Linf 8/255, 10 steps of 2/255, beta 6) of the CIFAR ResNet-18, the whole training step's gradient in
  one program; the floor is K + 1 (PGD-AT) or K + 2 (TRADES) times the plain CE step's time.
- ``APGD-CE`` (L-inf, 8/255, 100 iterations) and ``Square`` (L-inf, 8/255, 1,000 queries) on the CIFAR
  ResNet-18: images/s.
- ``sensitivity``: the unit-sensitivity search
  (:func:`advalign_jax.evaluation.sensitivity.optimize.item_sensitivity`, the study's procedure: both
  signs, 2 eps then eps, 20 steps per phase, decay 0.9) of ResNet-50's penultimate units (224 px, eps
  1) on a batch of 4 items x 2 x 16 restarts = 128 runs in one program: items/s (the "images"
  columns count items), the floor (``2 (1 + steps)`` times the measured forward-backward pass at the
  batch of runs, plus the measured forward passes of the final points and the clean images) and, in
  the note, ours / floor and the projected time of the study's workload at this rate (21 sites x 42
  images x 7 eps x 2 signs x 100 restarts = 1,234,800 runs of 2 x 21 passes, per model).

``--smoke`` shrinks everything (a 2-stage ``small_cnn`` and a 2-stage CIFAR ResNet of width 4-8,
16-32 px images, a few images, items and steps, XLA's cheapest compilation) so the whole table is
produced on a CPU in about a minute; its numbers only show that every row runs. The full mode is
sized to take under 8 minutes on one GPU.
"""

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "references"))
sys.path.insert(0, os.path.dirname(__file__))

from timing import best_time  # noqa: E402  (benchmarks/timing.py)

from advalign_jax.attacks.apgd import APGDConfig, apgd  # noqa: E402
from advalign_jax.attacks.search import REFERENCE_ATTACK, ReferenceSearch, attacks_per_image, reference_search  # noqa: E402
from advalign_jax.attacks.square import SquareConfig, square  # noqa: E402
from advalign_jax.evaluation.sensitivity.optimize import SearchConfig, item_sensitivity  # noqa: E402
from advalign_jax.losses import pag as P  # noqa: E402
from advalign_jax.models import get_model  # noqa: E402
from advalign_jax.training import objectives  # noqa: E402
from advalign_jax.training.config_blocks import REFERENCE_DECAY_EXCLUDE, objective_block  # noqa: E402
from advalign_jax.training.objectives import ce as ce_objective  # noqa: E402
from advalign_jax.training.objectives import harmonizer  # noqa: E402

PARTS = ("eps", "train", "pag", "adversarial", "attacks", "sensitivity")
# The sensitivity study's workload per model (configs/sensitivity.py): sites, images, eps, restarts per sign.
STUDY_SITES, STUDY_IMAGES, STUDY_EPS, STUDY_RESTARTS, STUDY_STEPS = 21, 42, 7, 100, 20
# Dense peak FLOP/s by a substring of device_kind: (bfloat16, float32 at XLA's default precision = TF32).
PEAK_FLOPS = {"H100": (989e12, 494e12), "H200": (989e12, 494e12), "A100": (312e12, 156e12),
              "L4": (121e12, 60e12), "TPU v4": (275e12, 275e12), "TPU v5 lite": (197e12, 197e12),
              "TPU v5p": (459e12, 459e12), "TPU v6": (918e12, 918e12)}
# XLA:CPU's cheapest compilation (the smoke run compiles far more than it runs).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

COLUMNS = ("part", "case", "images", "compile s", "run s", "images/s", "XLA temp MiB", "device peak MiB",
           "GFLOP", "floor s", "note")


@dataclasses.dataclass
class Sizes:
    """Everything the smoke mode shrinks."""

    eps_model: str = "resnet50"
    eps_options: dict = dataclasses.field(default_factory=dict)
    eps_images: int = 1000
    eps_batch: int = 250
    train_model: str = "resnet50v2"
    train_options: dict = dataclasses.field(default_factory=dict)
    train_batch: int = 32
    cifar_options: dict = dataclasses.field(default_factory=dict)
    pag_batch: int = 128
    pag_ks: tuple = (1, 10)
    attack_images: int = 500
    apgd_iter: int = 100
    square_queries: int = 1000
    sens_model: str = "resnet50"
    sens_options: dict = dataclasses.field(default_factory=dict)
    sens_items: int = 4
    sens_restarts: int = 16
    sens_steps: int = STUDY_STEPS
    repeats: int = 3


def smoke_sizes() -> Sizes:
    small = dict(num_classes=10, widths=(8, 16), patch=4, input_size=16)
    return Sizes(eps_model="small_cnn", eps_options=small, eps_images=8, eps_batch=4, train_model="small_cnn",
                 train_options=dict(small, input_size=32), train_batch=4,
                 cifar_options=dict(stage_sizes=(1, 1), widths=(4, 8), input_size=16), pag_batch=4,
                 attack_images=4, apgd_iter=5, square_queries=20, sens_model="small_cnn", sens_options=small,
                 sens_items=2, sens_restarts=2, sens_steps=2, repeats=1)


class Suite:
    def __init__(self, sizes: Sizes, smoke: bool):
        self.sizes, self.smoke, self.rows = sizes, smoke, []
        self.device = jax.devices()[0]
        self.kind = self.device.device_kind
        self.peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in self.kind.lower()), None)

    # ------------------------------------------------------------------ helpers

    def jit(self, fn):
        return jax.jit(fn, compiler_options=FAST_COMPILE) if self.smoke else jax.jit(fn)

    def init(self, model):
        variables = self.jit(lambda key: model.module.init(key, model.dummy_input(), train=False))(
            jax.random.PRNGKey(0))
        return {k: v for k, v in variables.items() if k != "intermediates"}

    def compile(self, fn, *args):
        """(compiled, compile seconds, XLA temp bytes, XLA flops) of ``jax.jit(fn)`` at ``args``."""
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        compiled = lowered.compile(compiler_options=FAST_COMPILE) if self.smoke else lowered.compile()
        seconds = time.perf_counter() - start
        memory = getattr(compiled.memory_analysis(), "temp_size_in_bytes", float("nan"))
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return compiled, seconds, float(memory), float((cost or {}).get("flops", float("nan")))

    def flops(self, fn, *args) -> float:
        """XLA's FLOP count of ``fn`` at ``args``, from the lowered program (no compilation) where the
        backend gives it, else from the compiled one."""
        lowered = jax.jit(fn).lower(*args)
        try:
            cost = lowered.cost_analysis()
        except Exception:  # pylint: disable=broad-except
            cost = None
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if not cost or "flops" not in cost:
            return self.compile(fn, *args)[3]
        return float(cost["flops"])

    def device_peak_mib(self) -> float:
        stats = self.device.memory_stats() if hasattr(self.device, "memory_stats") else None
        return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else float("nan")

    def add(self, part, case, images, compile_s, run_s, temp_bytes=float("nan"), gflop=float("nan"),
            floor_s=float("nan"), note=""):
        self.rows.append(dict(zip(COLUMNS, (part, case, images, compile_s, run_s, images / run_s,
                                            temp_bytes / 2**20, self.device_peak_mib(), gflop, floor_s, note))))

    def timed(self, part, case, images, fn, args, note="", flops_fn=None):
        """Compiles ``fn`` at ``args``, times it, adds a row; returns the compiled function."""
        compiled, c_s, temp, flops = self.compile(fn, *args)
        jax.block_until_ready(compiled(*args))
        run_s = best_time(lambda: jax.block_until_ready(compiled(*args)), self.sizes.repeats)
        self.add(part, case, images, c_s, run_s, temp, flops / 1e9, note=note)
        return compiled

    def peak_for(self, dtype) -> float:
        if self.peak is None:
            return float("nan")
        return self.peak[0] if dtype == "bfloat16" else self.peak[1]

    # ------------------------------------------------------------------ (a) the minimal-eps search

    def minimal_eps(self):
        s = self.sizes
        rng = np.random.default_rng(0)
        for dtype in ("float32", "bfloat16"):
            model = get_model(s.eps_model, **{**s.eps_options, "dtype": dtype})
            variables = self.init(model)
            size = model.input_size
            x = jnp.asarray(rng.uniform(size=(s.eps_images, size, size, 3)).astype(np.float32))
            y = jnp.argmax(self.jit(model.apply)(variables, x[:s.eps_batch]), axis=1)
            y = jnp.tile(y, -(-s.eps_images // s.eps_batch))[:s.eps_images]  # labels: a clean prediction

            def search(v, xb, yb, model=model):
                return reference_search(model.logits_fn(v), xb, yb)["eps"]

            xb, yb = x[:s.eps_batch], y[:s.eps_batch]
            compiled, c_s, temp, _ = self.compile(search, variables, xb, yb)
            jax.block_until_ready(compiled(variables, xb, yb))

            def run_all(compiled=compiled, variables=variables, x=x, y=y):
                outs = [compiled(variables, x[i:i + s.eps_batch], y[i:i + s.eps_batch])
                        for i in range(0, s.eps_images - s.eps_batch + 1, s.eps_batch)]
                return jax.block_until_ready(outs)

            run_s = best_time(run_all, max(1, s.repeats - 1))
            images = (s.eps_images // s.eps_batch) * s.eps_batch
            # per image: 9 attacks x 3 steps of forward + backward, 9 checking forwards and the clean one
            grads = attacks_per_image() * REFERENCE_ATTACK.steps
            fwds = attacks_per_image() + 1
            one = x[:1]
            fb = self.flops(lambda v, xi, m=model: jax.grad(lambda z: jnp.sum(
                jax.nn.log_softmax(m.apply(v, z))[:, 0]))(xi), variables, one)
            f = self.flops(lambda v, xi, m=model: m.apply(v, xi), variables, one)
            flops = images * (grads * fb + fwds * f)
            floor = flops / self.peak_for(dtype)
            self.add("minimal-eps search", f"{s.eps_model} {size}px {dtype}, batch {s.eps_batch}", images, c_s,
                     run_s, temp, flops / 1e9, floor,
                     note=f"{grads} gradient + {fwds} forward evaluations per image; goal < 10 s per 1,000 images")
            assert ReferenceSearch().bisection_steps == attacks_per_image() - 2

    # ------------------------------------------------------------------ (b) CE and harmonizer steps

    def training_steps(self):
        s = self.sizes
        rng = np.random.default_rng(1)
        base = get_model(s.train_model, **s.train_options)
        variables = self.init(base)
        size, n = base.input_size, s.train_batch
        batch = {"image": jnp.asarray(rng.uniform(size=(n, size, size, 3)).astype(np.float32)),
                 "label": jnp.asarray(rng.integers(0, base.num_classes, size=n)),
                 "heatmap": jnp.asarray(rng.uniform(size=(n, size, size)).astype(np.float32) ** 4),
                 "token": jnp.ones(n, jnp.float32)}
        state = {"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {}

        def cfg(order):
            return ml_collections.ConfigDict(dict(lambda_harmonization=1.0, pyramid_levels=5, saliency="mean",
                                                  label_smoothing=0.1, weight_decay=1e-5,
                                                  decay_exclude=REFERENCE_DECAY_EXCLUDE, differentiation=order))

        cases = [("CE step", ce_objective, False, "reverse_over_reverse"),
                 ("CE step", ce_objective, True, "reverse_over_reverse")]
        cases += [("harmonizer step", harmonizer, False, order) for order in harmonizer.DIFFERENTIATIONS]
        cases += [("harmonizer step", harmonizer, True, "reverse_over_reverse")]  # remat: the default order
        for name, objective, remat, order in cases:
            model = get_model(s.train_model, **{**s.train_options, "remat": remat})

            def step(p, st, b, model=model, objective=objective, order=order):
                return jax.grad(lambda q: objective.loss(model, q, st, b, None, cfg(order))[0])(p)

            label = f"{s.train_model} {size}px float32, batch {n}, remat {remat}"
            if objective is harmonizer:
                label += f", {order}"
            self.timed(name, label, n, step, (variables["params"], state, batch))

    # ------------------------------------------------------------------ (c) the PAG step

    def pag_steps(self, use_torch: bool):
        s = self.sizes
        model = get_model("cifar_resnet18", num_classes=10, **s.cifar_options)
        variables = self.init(model)
        state = {"batch_stats": variables["batch_stats"]}
        size, n = model.input_size, s.pag_batch
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.uniform(size=(n, size, size, 3)).astype(np.float32))
        y = jnp.asarray(rng.integers(0, 10, size=n).astype(np.int32))
        targets = jnp.asarray(rng.normal(size=(n, 10, size, size, 3)).astype(np.float32))
        orders = np.stack([rng.permutation(10) for _ in range(n)]).astype(np.int32)
        arch = f"cifar_resnet18{'' if not s.cifar_options else ' (narrow)'} {size}px float32, batch {n}"

        def plain(p, st, x, y):
            return jax.grad(lambda q: P.cross_entropy(model.apply_train({"params": q, **st}, x)[0], y))(p)

        data = (state, x, y)
        self.timed("PAG: plain CE step", arch, n, plain, (variables["params"],) + data)
        for k in s.pag_ks:
            classes = jnp.asarray(orders[:, :k])
            for order in P.DIFFERENTIATIONS:
                cfg = P.PAGConfig(weight=15.0, num_targets=k if k < 10 else None, differentiation=order)

                def step(p, state, x, y, targets, classes, cfg=cfg):
                    def loss(q):
                        apply_fn = lambda st, xi: model.apply_train({"params": q, **st}, xi)  # noqa: E731
                        return P.pag_loss(apply_fn, state, x, y, targets, cfg, classes=classes)[0]
                    return jax.grad(loss)(p)

                self.timed("PAG step", f"{arch}, K={k}, shared, {order}", n, step,
                           (variables["params"],) + data + (targets, classes))
        if use_torch:
            self.pag_reference(x, y, targets, orders, n)

    # ------------------------------------------------------------------ (d) adversarial training steps

    def adversarial_steps(self):
        s = self.sizes
        model = get_model("cifar_resnet18", num_classes=10, **s.cifar_options)
        variables = self.init(model)
        state = {"batch_stats": variables["batch_stats"]}
        size, n = model.input_size, s.pag_batch
        rng = np.random.default_rng(3)
        batch = {"image": jnp.asarray(rng.uniform(size=(n, size, size, 3)).astype(np.float32)),
                 "label": jnp.asarray(rng.integers(0, 10, size=n).astype(np.int32)), "step": jnp.int32(0)}
        arch = f"cifar_resnet18{'' if not s.cifar_options else ' (narrow)'} {size}px float32, batch {n}"

        def plain(p, st, b):
            return jax.grad(lambda q: ce_objective.loss(model, q, st, b, None, objective_block("ce"))[0])(p)

        plain_c = self.timed("adversarial: plain CE step", arch, n, plain, (variables["params"], state, batch))
        plain_s = best_time(lambda: jax.block_until_ready(plain_c(variables["params"], state, batch)), s.repeats)
        cases = (("PGD-AT step", "adversarial", 7, dict(constraint="l2", eps=0.5, step_size=0.1, steps=7), 1),
                 ("TRADES step", "trades", 10, dict(constraint="linf", eps=8 / 255, step_size=2 / 255, steps=10,
                                                     beta=6.0), 2))
        for part, name, k, attack, loss_passes in cases:
            cfg = objective_block(name)
            cfg.adversarial.update(attack)
            objective = objectives.get(name)

            def step(p, st, b, objective=objective, cfg=cfg):
                return jax.grad(lambda q: objective.loss(model, q, st, b, jax.random.PRNGKey(0), cfg)[0])(p)

            self.timed(part, f"{arch}, K={k}", n, step, (variables["params"], state, batch))
            self.rows[-1]["floor s"] = (k + loss_passes) * plain_s

    def pag_reference(self, x, y, targets, orders, n):
        """The official PyTorch formulation beside ours, on the same kind of device (skipped otherwise)."""
        try:
            import torch  # pylint: disable=import-outside-toplevel

            import pag_step  # benchmarks/pag_step.py  pylint: disable=import-outside-toplevel
        except ImportError as e:
            self.rows.append({**dict.fromkeys(COLUMNS, float("nan")), "part": "PAG step (PyTorch reference)",
                              "case": "skipped", "images": 0, "note": f"PyTorch not importable ({e})"})
            return
        platform = self.device.platform
        device = "cuda" if platform == "gpu" and torch.cuda.is_available() else ("cpu" if platform == "cpu" else None)
        if device is None or self.sizes.cifar_options:
            why = "PyTorch does not see this device" if device is None else "the smoke model has no PyTorch twin"
            self.rows.append({**dict.fromkeys(COLUMNS, float("nan")), "part": "PAG step (PyTorch reference)",
                              "case": "skipped", "images": 0, "note": why})
            return
        net, _, _ = pag_step.torch_net_and_ours(device=device)
        if net is None:
            return
        for k in self.sizes.pag_ks:
            _, pag = pag_step.torch_steps(net, np.asarray(x), np.asarray(y), np.asarray(targets), orders[:, :k],
                                          device=device)
            start = time.perf_counter()
            pag()
            first = time.perf_counter() - start
            self.add("PAG step (PyTorch reference)", f"official formulation, K={k}, {device}, torch "
                     f"{torch.__version__}", n, first, best_time(pag, self.sizes.repeats),
                     note="compile s: the first call")

    # ------------------------------------------------------------------ (d) APGD and Square

    def attacks(self):
        s = self.sizes
        model = get_model("cifar_resnet18", num_classes=10, **s.cifar_options)
        variables = self.init(model)
        size, n = model.input_size, s.attack_images
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.uniform(size=(n, size, size, 3)).astype(np.float32))
        y = jnp.argmax(self.jit(model.apply)(variables, x), axis=1)  # all correctly classified: every iteration runs
        eps = 8 / 255
        arch = f"cifar_resnet18{'' if not s.cifar_options else ' (narrow)'} {size}px float32"
        a_cfg = APGDConfig(norm="linf", n_iter=s.apgd_iter)
        q_cfg = SquareConfig(norm="linf", n_queries=s.square_queries)
        self.timed("APGD-CE", f"{arch}, L-inf 8/255, {s.apgd_iter} iterations", n,
                   lambda v, xx, yy: apgd(model.logits_fn(v), xx, yy, eps, a_cfg)[0], (variables, x, y))
        self.timed("Square", f"{arch}, L-inf 8/255, {s.square_queries} queries", n,
                   lambda v, xx, yy: square(model.logits_fn(v), xx, yy, eps, q_cfg)[0], (variables, x, y))

    # ------------------------------------------------------------------ (e) the unit-sensitivity search

    def sensitivity(self):
        s = self.sizes
        model = get_model(s.sens_model, **s.sens_options)
        variables = self.init(model)
        size, b, r, steps = model.input_size, s.sens_items, s.sens_restarts, s.sens_steps
        cfg = SearchConfig(restarts=r, steps=steps, wide=2.0, decay=0.9, start="random", clip=(0.0, 1.0))

        def features(v, z):
            return model.intermediates(v, z)["features"]

        units = int(jax.eval_shape(features, variables, model.dummy_input(1)).shape[1])
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.uniform(size=(b, size, size, 3)).astype(np.float32))
        unit = jnp.asarray(np.arange(b) % units, jnp.int32)
        eps = jnp.ones(b, jnp.float32)
        keys = jax.random.split(jax.random.PRNGKey(0), b)

        def search(v, xb, ub, eb, kb):
            return item_sensitivity(lambda z: features(v, z), xb, ub, eb, kb, cfg)["sensitivity"]

        runs = b * 2 * r
        self.timed("sensitivity", f"{s.sens_model} {size}px float32, features units, {b} items x {2 * r} runs, "
                   f"{steps} steps", b, search, (variables, x, unit, eps, keys))
        row = self.rows[-1]

        # the floor: 2 (1 + steps) forward-backward passes at the batch of runs, plus the forwards of the
        # runs' final points and of the items' clean images, each measured alone
        def fwd_bwd(v, z, u):
            return jax.grad(lambda q: jnp.sum(jnp.take_along_axis(features(v, q), u[:, None], axis=1)))(z)

        def fwd(v, z, u):
            return jnp.take_along_axis(features(v, z), u[:, None], axis=1)[:, 0]

        xs, us = jnp.repeat(x, 2 * r, axis=0), jnp.repeat(unit, 2 * r)
        piece = {}
        for name, fn, args in (("pass", fwd_bwd, (variables, xs, us)), ("forward", fwd, (variables, xs, us)),
                               ("clean", fwd, (variables, x, unit))):
            compiled = self.compile(fn, *args)[0]
            piece[name] = best_time(lambda c=compiled, a=args: jax.block_until_ready(c(*a)), s.repeats)
        per_run = 2 * (1 + steps)
        floor = per_run * piece["pass"] + piece["forward"] + piece["clean"]
        row["floor s"] = floor
        study_runs = STUDY_SITES * STUDY_IMAGES * STUDY_EPS * 2 * STUDY_RESTARTS
        # per run-pass time of ours, scaled to the study's passes per run
        projected = row["run s"] / (runs * per_run) * study_runs * 2 * (1 + STUDY_STEPS)
        row["note"] = (f"{runs / row['run s']:.3g} runs/s, {runs * per_run} forward-backward passes; ours / floor "
                       f"{row['run s'] / floor:.2f}; the study ({STUDY_SITES} sites x {STUDY_IMAGES} images x "
                       f"{STUDY_EPS} eps x 2 x {STUDY_RESTARTS} restarts = {study_runs:,} runs of "
                       f"{2 * (1 + STUDY_STEPS)} passes) at this rate: {projected / 3600:.3g} h per model")

    # ------------------------------------------------------------------ the table

    def markdown(self, total_s: float) -> str:
        peak = ("peak FLOP/s (bfloat16, float32) " + ", ".join(f"{p / 1e12:.0f} T" for p in self.peak)
                if self.peak else "peak FLOP/s unknown to this script: the floor column is empty, GFLOP is the count")
        lines = [f"device: {self.kind} ({self.device.platform}, {jax.device_count()} device(s)); jax {jax.__version__}; "
                 f"{peak}; {'smoke sizes' if self.smoke else 'full sizes'}; best of {self.sizes.repeats}; "
                 f"{os.cpu_count()} CPU cores, 1-minute load {os.getloadavg()[0]:.1f}; total {total_s:.0f} s",
                 "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]

        def fmt(v):
            if isinstance(v, float):
                if math.isnan(v):
                    return "n/a"
                return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
            return str(v)

        for row in self.rows:
            lines.append("| " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |")
        return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: every row runs on a CPU in about a minute")
    parser.add_argument("--out", default="results/device_suite.md", help="the Markdown table is also written here")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--images", type=int, default=0, help="images of the minimal-eps search (default 1000)")
    parser.add_argument("--eps-batch", type=int, default=0, help="its batch size (default 250)")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per row (best of; default 3)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference of the PAG step")
    args = parser.parse_args(argv)

    sizes = smoke_sizes() if args.smoke else Sizes()
    if args.images:
        sizes.eps_images = args.images
    if args.eps_batch:
        sizes.eps_batch = args.eps_batch
    sizes.eps_batch = min(sizes.eps_batch, sizes.eps_images)
    if args.repeats:
        sizes.repeats = args.repeats
    suite = Suite(sizes, args.smoke)
    print(f"device: {suite.kind}", flush=True)
    start = time.perf_counter()
    for part in PARTS:
        if part not in args.parts:
            continue
        t = time.perf_counter()
        if part == "eps":
            suite.minimal_eps()
        elif part == "train":
            suite.training_steps()
        elif part == "pag":
            suite.pag_steps(use_torch=not args.no_torch and not args.smoke)
        elif part == "adversarial":
            suite.adversarial_steps()
        elif part == "attacks":
            suite.attacks()
        else:
            suite.sensitivity()
        print(f"[{part}: {time.perf_counter() - t:.0f} s]", flush=True)
    table = suite.markdown(time.perf_counter() - start)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
