"""What JAX's persistent compilation cache saves: each command run twice on an empty cache directory
(the first run compiles and fills it, the second reuses it), each run in a fresh workdir.

    python benchmarks/compile_cache.py [--repeats 1] [--commands demo clickme robust train]

Reported per command: the wall time of the first (cold) and second (warm) run, what the cache saved
(cold - warm) and its share of the cold run (``1 - warm / cold``): a lower bound of the compile share
of the command's time, since reading the cached programs costs something too. With ``--repeats R`` each
pair runs R times (a fresh cache each time), alternating commands, and the medians are printed.
Every command runs as a user would run it (``advalign-jax ...`` in a subprocess, ``--no-progress``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {
    "demo": ["evaluate", "--config", "configs/adversarial_alignment.py"],  # make demo
    "clickme": ["evaluate-clickme", "--config", "configs/human_alignment.py"],
    "robust": ["evaluate-robust", "--config", "configs/robustness.py:runlocal",
               "--config.attacks=('autoattack-linf',)"],
    "train": ["train", "--config", "configs/demo.py:runlocal", "--config.data.files=('advalign_jax/data/embedded/val-*.tfrecords',)"],
}


def run_once(name: str, cache: str, workdir: str) -> float:
    """Wall seconds of one run of command ``name`` with the cache in ``cache``."""
    env = dict(os.environ, ADVALIGN_JAX_CACHE_DIR=cache)
    cmd = [sys.executable, "-m", "advalign_jax.cli.main"] + COMMANDS[name] + [f"--config.workdir={workdir}",
                                                                             "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    cold = {n: [] for n in args.commands}
    warm = {n: [] for n in args.commands}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in args.commands:
                cache = os.path.join(tmp, f"cache_{name}_{r}")
                cold[name].append(run_once(name, cache, os.path.join(tmp, f"{name}_{r}_cold")))
                warm[name].append(run_once(name, cache, os.path.join(tmp, f"{name}_{r}_warm")))
                shutil.rmtree(cache, ignore_errors=True)
                print(f"  {name} round {r}: cold {cold[name][-1]:.1f} s, warm {warm[name][-1]:.1f} s", flush=True)
    print("\n| command | first run (empty cache) s | second run (cache filled) s | saved s | share of the first run |")
    print("|---|---|---|---|---|")
    for name in args.commands:
        c, w = statistics.median(cold[name]), statistics.median(warm[name])
        shown = " ".join(COMMANDS[name][:3])
        print(f"| `advalign-jax {shown}` | {c:.1f} | {w:.1f} | {c - w:.1f} | {100 * (1 - w / c):.0f}% |")


if __name__ == "__main__":
    main()
