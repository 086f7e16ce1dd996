"""XLA:CPU compiler options for convolutions and matrix products: throughput and agreement, alternating.

    python benchmarks/xla_cpu_options.py [--batch 8] [--size 224] [--rounds 5] [--archs ...] [--options ...]
    python benchmarks/xla_cpu_options.py --probe      # which options change the compiled program at all

XLA flags are read once, when a process starts, so each option runs in its own worker process (its
``XLA_FLAGS``); every worker compiles every model's forward pass (inference-mode logits) and
input-gradient (the gradient of the mean cross-entropy w.r.t. the images, what an attack and a saliency
map compute) once. The driver then times them in turn, round after round: for each round, each model
and each of the two programs, one call in each worker (A, B, C, A, B, C, ...), so that a change of
the machine's load falls on every option alike. Reported per option and model: the median over the
rounds of images/s, the median of the per-round ratio to the default taken in the same round (option /
default, > 1 is faster), its spread (the smallest and largest per-round ratio), and the largest
difference of the outputs from the default's (relative to the largest magnitude).

``--probe`` compiles a ResNet (convolutions) and a ViT (matrix products) under every candidate flag
and prints a fingerprint of the optimised program: a flag whose program is byte-identical to the
default's does nothing for these models in this jaxlib and needs no timing.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

# Candidate options: a label -> XLA_FLAGS. In jaxlib 0.10.2 XLA:CPU hands convolutions and matrix
# products to YNNPACK by default (the "__ynn_fusion" fusions; fusion types individual_convolution and
# individual_dot/dot); the YNN fusion list can be changed with +/- items.
OPTIONS = {
    "default": "",
    "no YNN convolutions": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "no YNN matmuls": "--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-dot",
    "no YNN (Eigen)": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot,-dot",
    "YNN + eltwise, reduce": "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
}
# Flags that exist in this jaxlib (an unknown flag aborts XLA) and are probed, not timed, when they
# compile to the default's program.
PROBE_ONLY = {
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn custom call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "onednn fusion dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn fusion dot,eltwise,reduce": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn graph fusion greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast math": "--xla_cpu_enable_fast_math=true",
}


# ---------------------------------------------------------------------------------------------------
# Worker: compiles every program once, then runs one on request.
# ---------------------------------------------------------------------------------------------------


def _programs(archs, batch, size):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from advalign_jax.models import get_model  # pylint: disable=import-outside-toplevel

    x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 3)).astype(np.float32))
    y = jnp.asarray(np.arange(batch) % 10)
    out = {}
    for arch in archs:
        model = get_model(arch)
        variables = model.init(jax.random.PRNGKey(0))

        def loss(v, xx, model=model):
            logp = jax.nn.log_softmax(model.apply(v, xx))
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

        fwd = jax.jit(model.apply).lower(variables, x).compile()
        grad = jax.jit(jax.grad(loss, argnums=1)).lower(variables, x).compile()
        out[(arch, "forward")] = lambda fwd=fwd, v=variables: fwd(v, x)
        out[(arch, "input-gradient")] = lambda grad=grad, v=variables: grad(v, x)
    return out


def worker(args):
    programs = _programs(args.archs, args.batch, args.size)
    for key, fn in programs.items():  # first call (warm-up) and the outputs for the agreement check
        np.save(os.path.join(args.outdir, f"{key[0]}.{key[1]}.npy"), np.asarray(fn()))
    print("ready", flush=True)
    for line in sys.stdin:
        arch, kind = json.loads(line)
        fn = programs[(arch, kind)]
        start = time.perf_counter()
        fn().block_until_ready()
        print(json.dumps(time.perf_counter() - start), flush=True)


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def probe():
    code = (
        "import hashlib, re, jax, jax.numpy as jnp\n"
        "from collections import Counter\n"
        "from advalign_jax.models import get_model\n"
        "for name, s in (('resnet50v2', 64), ('vit_b16', 224)):\n"
        "    m = get_model(name); v = m.init(jax.random.PRNGKey(0))\n"
        "    t = jax.jit(m.apply).lower(v, jnp.ones((2, s, s, 3))).compile().as_text()\n"
        "    k = dict(Counter(re.findall(r'\"fusion_config\":\\{\"kind\":\"(\\w+)\"', t)))\n"
        "    print(name, hashlib.md5(t.encode()).hexdigest()[:8], k, flush=True)\n")
    base = None
    print("| option | XLA_FLAGS | resnet50v2 program | vit_b16 program | same as default |")
    print("|---|---|---|---|---|")
    for label, flags in {**OPTIONS, **PROBE_ONLY}.items():
        run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": flags},
                             capture_output=True, text=True, check=False)
        lines = [ln for ln in run.stdout.splitlines() if ln.split(" ")[0] in ("resnet50v2", "vit_b16")]
        if run.returncode or len(lines) != 2:
            print(f"| {label} | `{flags}` | failed: {run.stderr.strip().splitlines()[-1:]} | | |")
            continue
        prints = [ln.split(" ", 2) for ln in lines]
        if base is None:
            base = [p[1] for p in prints]
        same = [p[1] for p in prints] == base
        print(f"| {label} | `{flags or '(none)'}` | {prints[0][1]} {prints[0][2]} | {prints[1][1]} {prints[1][2]} | "
              f"{'yes' if same else 'no'} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--archs", nargs="+", default=["resnet50_keras", "resnet50v2", "vgg16", "efficientnet_b0",
                                                       "convnext_tiny", "resnet50", "vit_b16"])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), help="labels of OPTIONS to time")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--outdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.probe:
        return probe()
    if args.options[0] != "default":
        args.options = ["default"] + [o for o in args.options if o != "default"]

    tmp = tempfile.mkdtemp(prefix="xla_cpu_options_")
    procs = {}
    for label in args.options:
        outdir = os.path.join(tmp, re.sub(r"\W+", "_", label))
        os.makedirs(outdir)
        cmd = [sys.executable, __file__, "--worker", "--outdir", outdir, "--batch", str(args.batch),
               "--size", str(args.size), "--archs", *args.archs]
        env = {**os.environ, "XLA_FLAGS": OPTIONS[label]}
        procs[label] = (subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True), outdir)
        # Compile one worker at a time: compilations would otherwise share the cores with each other.
        if procs[label][0].stdout.readline().strip() != "ready":
            raise SystemExit(f"worker {label!r} failed")
        print(f"{label}: compiled", file=sys.stderr, flush=True)

    kinds = ("forward", "input-gradient")
    times = {(o, a, k): [] for o in args.options for a in args.archs for k in kinds}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for arch in args.archs:
            for kind in kinds:
                for label in args.options:
                    proc = procs[label][0]
                    proc.stdin.write(json.dumps([arch, kind]) + "\n")
                    proc.stdin.flush()
                    times[(label, arch, kind)].append(json.loads(proc.stdout.readline()))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
    for proc, _ in procs.values():
        proc.stdin.close()
        proc.wait()

    print(f"XLA:CPU options: {args.batch} images of {args.size} px, float32, {args.rounds} alternating rounds, "
          f"{os.cpu_count()} CPU cores, 1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs")
    print("images/s (median of rounds); ratio = option / default in the same round: median [min, max]; "
          "agreement = max |option - default| / max |default|")
    header = "| model | program | " + " | ".join(args.options) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    base = "default"
    for arch in args.archs:
        for kind in kinds:
            ref = np.load(os.path.join(procs[base][1], f"{arch}.{kind}.npy"))
            cells = []
            t0 = np.asarray(times[(base, arch, kind)])
            for label in args.options:
                t = np.asarray(times[(label, arch, kind)])
                rate = args.batch / np.median(t)
                if label == base:
                    spread = (t.max() - t.min()) / np.median(t)
                    cells.append(f"{rate:.2f} (spread {spread:.0%})")
                    continue
                ratios = t0 / t
                out = np.load(os.path.join(procs[label][1], f"{arch}.{kind}.npy"))
                agree = float(np.abs(out - ref).max() / np.abs(ref).max())
                cells.append(f"{rate:.2f}; {np.median(ratios):.2f} [{ratios.min():.2f}, {ratios.max():.2f}]; "
                             f"{agree:.1e}")
            print(f"| {arch} | {kind} | " + " | ".join(cells) + " |")
    print("options: " + "; ".join(f"{label}: `{OPTIONS[label] or '(none)'}`" for label in args.options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
