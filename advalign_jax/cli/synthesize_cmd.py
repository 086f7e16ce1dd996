"""``advalign-jax synthesize``: robust models as image generators."""

from __future__ import annotations

import argparse
import os

from advalign_jax.cli.common import config_arguments, job_config, lead, text_table
from advalign_jax.synthesis import synthesize

DEFAULT_CONFIG = "configs/synthesize.py"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "synthesize", help="class-conditional generation, inversion, interpolation, feature visualisation",
        description="Plain L2 gradient steps on a model's input (the robustness library's attack): images of a "
                    "class generated from class-Gaussian seeds, representations inverted from noise and "
                    "interpolated, units of the representation maximised. Writes, per model, TASK.png (the "
                    "grid), TASK.npz (seeds and results) and TASK.csv in the workdir, and summary.csv (the "
                    "model's own and an independent judge's accuracy on the generated images, mean losses with "
                    "intervals); resumes an interrupted run.",
        epilog=f"Example: advalign-jax synthesize --config {DEFAULT_CONFIG}:runlocal")
    config_arguments(p, DEFAULT_CONFIG)
    p.set_defaults(func=run)


def format_summary(rows) -> str:
    return text_table([c for c in synthesize.SUMMARY_COLUMNS if any(str(r.get(c, "")) != "" for r in rows)], rows)


def run(args: argparse.Namespace) -> int:
    config = job_config(args)
    rows = synthesize.synthesize(config, progress=not args.no_progress)
    if not lead():
        return 0
    print(format_summary(rows))
    print(f"results: {os.path.join(config.workdir, 'summary.csv')} (grids: {config.workdir}/MODEL/TASK.png)")
    return 0
