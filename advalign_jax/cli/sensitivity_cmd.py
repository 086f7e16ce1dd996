"""``advalign-jax evaluate-sensitivity``: how far an L2 perturbation can move one unit of a model."""

from __future__ import annotations

import argparse
import os

from advalign_jax.cli.common import config_arguments, job_config, lead, text_table
from advalign_jax.evaluation.sensitivity import job as sensitivity

DEFAULT_CONFIG = "configs/sensitivity.py"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate-sensitivity", help="unit-level adversarial sensitivity of model units or neural sites",
        description="For each image, unit and L2 radius eps: the largest change of the unit's response a "
                    "perturbation of norm <= eps finds (both signs, random restarts, a 2 eps then eps phase, an "
                    "annealed step; a lower bound of the true maximum), normalised by the unit's spread over the "
                    "clean images, averaged over units and images with bootstrap intervals, beside the "
                    "random-image-pair baseline; units are a layer's units or the sites of a readout fitted to "
                    "recordings (--config.recordings). Writes per_item/MODEL.csv, summary.csv, comparison.csv "
                    "(paired between models), readout.csv and sensitivity.png in the workdir; resumes an "
                    "interrupted run.",
        epilog=f"Example: advalign-jax evaluate-sensitivity --config {DEFAULT_CONFIG}:runlocal")
    config_arguments(p, DEFAULT_CONFIG)
    p.set_defaults(func=run)


def format_summary(rows) -> str:
    cols = ["model", "eps", "num_units", "normalized", "normalized_low", "normalized_high", "baseline",
            "ratio_to_baseline"]
    if rows and rows[0].get("target_reached", "") != "":
        cols += ["target_distance", "target_reached"]
    return text_table(cols, rows)


def run(args: argparse.Namespace) -> int:
    config = job_config(args)
    rows = sensitivity.evaluate(config, progress=not args.no_progress)
    if not lead():
        return 0
    print(format_summary(rows))
    print(f"results: {os.path.join(config.workdir, 'summary.csv')} (figure: "
          f"{os.path.join(config.workdir, 'sensitivity.png')})")
    return 0
