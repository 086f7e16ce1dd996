"""Per-step training time as N JAX processes on this machine (scripts/launch_local.sh) against one
process with as many devices, on the tiny configs: where the cross-process collectives' overhead starts.

    python benchmarks/multiprocess_scaling.py [--processes 1 2 4] [--steps 200] [--config pag_digits]

Each run trains ``--steps`` steps of ``configs/pag_digits.py:runlocal`` (PAG, a small CNN on
scikit-learn's digits) or ``configs/pag_toy2d.py:runlocal`` with one simulated CPU device per process
(``N x 1``), and as one process with N devices (``1 x N``), at the same global batch; the per-step
time is the median of ``step_time_s`` over the logged intervals after the first (compilation
excluded). On one machine the processes share its cores, so this measures the overhead of the
multi-controller path (gloo all-reduce over loopback, per-process input, coordination), not a speed-up;
on a pod each process has its own host.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"pag_digits": "configs/pag_digits.py:runlocal", "pag_toy2d": "configs/pag_toy2d.py:runlocal"}


def run(processes: int, devices: int, config: str, steps: int, batch: int, workdir: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               ADVALIGN_JAX_CACHE_DIR=os.path.join(workdir, "xla_cache"))
    cli = [sys.executable, "-m", "advalign_jax.cli.main", "train", "--config", config, "--no-progress",
           f"--config.workdir={os.path.join(workdir, f'{processes}x{devices}')}", f"--config.total_steps={steps}",
           f"--config.checkpoint_every={steps}", "--config.log_every=20", f"--config.data.batch_size={batch}",
           "--config.eval_every=0"]
    cmd = cli if processes == 1 else [sys.executable, "-m", "advalign_jax.launch", str(processes)] + cli
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{processes}x{devices} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(workdir, f"{processes}x{devices}", "metrics.csv"), newline="") as f:
        times = [float(r["step_time_s"]) for r in csv.DictReader(f) if r.get("step_time_s")]
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="global batch (a multiple of every N)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="pag_digits")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            single = run(1, n, CONFIGS[args.config], args.steps, args.batch, tmp)
            multi = run(n, 1, CONFIGS[args.config], args.steps, args.batch, tmp) if n > 1 else single
            rows.append((n, single, multi))
    print(f"{args.config}, global batch {args.batch}, {args.steps} steps, {os.cpu_count()} CPU cores")
    print("| N | 1 process x N devices (ms/step) | N processes x 1 device (ms/step) | ratio |")
    print("|---|---|---|---|")
    for n, single, multi in rows:
        print(f"| {n} | {1e3 * single:.1f} | {1e3 * multi:.1f} | {multi / single:.2f} |")


if __name__ == "__main__":
    main()
