"""``advalign-jax evaluate-robust``: clean and robust accuracy under PGD, APGD and AutoAttack."""

from __future__ import annotations

import argparse
import os

from advalign_jax.cli.common import job_config, lead
from advalign_jax.evaluation import robust

DEFAULT_CONFIG = "configs/robustness.py"


def add_parser(sub) -> None:
    rb = sub.add_parser(
        "evaluate-robust", help="robust accuracy under PGD and AutoAttack (APGD-CE, APGD-T, FAB-T, Square)",
        description="Clean and robust accuracy of one model on an array dataset (tfds:NAME, digits, toy2d, "
                    "synthetic, embedded) under L2/Linf PGD and AutoAttack: the standard ensemble (APGD-CE, "
                    "APGD-T, FAB-T, Square, each on the points the previous ones left), its plus and rand "
                    "versions, or any of its attacks alone, at RobustBench's radii by default (L2 0.5, Linf "
                    "8/255). An example counts as robust only if it is classified correctly clean and after the "
                    "attack. Prints and writes the robust accuracy after each stage and the time each took, "
                    "and AutoAttack's sanity checks (also logged as warnings). Writes per_example.csv and "
                    "summary.csv in the workdir; resumes an interrupted run (one run per workdir; a rerun over another "
                    "configuration or checkpoint is refused).",
        epilog=f"Example: advalign-jax evaluate-robust --config {DEFAULT_CONFIG} "
               "--config.model_dir=checkpoints/MODEL --config.max_examples=1000 --config.workdir=results/robust; "
               f"offline: advalign-jax evaluate-robust --config {DEFAULT_CONFIG}:runlocal "
               "--config.attacks=\"('autoattack-linf',)\"")
    rb.add_argument("--config", default=DEFAULT_CONFIG,
                    help=f"config FILE.py[:VARIANT] (default {DEFAULT_CONFIG}); override fields with "
                         "--config.KEY=VALUE")
    rb.add_argument("--no-progress", action="store_true", help="no progress bar")
    rb.set_defaults(func=run_evaluate_robust)


def run_evaluate_robust(args: argparse.Namespace) -> int:
    config = job_config(args)
    rows = robust.evaluate(config, progress=not args.no_progress)
    if not lead():
        return 0
    print(robust.format_summary(rows))
    print(f"results: {os.path.join(config.workdir, 'summary.csv')} (per example: "
          f"{os.path.join(config.workdir, 'per_example.csv')})")
    return 0
