"""``advalign-jax evaluate``: the adversarial-alignment evaluation over one model or many."""

from __future__ import annotations

import argparse
import os

from advalign_jax.cli.common import job_config, lead
from advalign_jax.evaluation import adversarial_alignment as aa
from advalign_jax.evaluation import human_alignment as ha

DEFAULT_CONFIG = "configs/adversarial_alignment.py"
HUMAN_CONFIG = "configs/human_alignment.py"


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "evaluate", help="smallest attacks and their alignment with human maps (the main job)",
        description="For each model and ClickMe image: the smallest L2 attack that flips the decision "
                    "(perturbation tolerance) and the Spearman correlation of its perturbation with the "
                    "human map (adversarial alignment). Writes per-image and summary CSVs, a scatter "
                    "plot and panels; resumes an interrupted run.",
        epilog=f"Example: advalign-jax evaluate --config {DEFAULT_CONFIG} "
               "--config.models=\"('resnet50=checkpoints/resnet50',)\" --config.workdir=results/r50")
    ev.add_argument("--config", default=DEFAULT_CONFIG,
                    help=f"config FILE.py[:VARIANT] (default {DEFAULT_CONFIG}); override fields with "
                         "--config.KEY=VALUE")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=run_evaluate)

    hc = sub.add_parser(
        "evaluate-clickme", help="the human-alignment score: saliency vs ClickMe maps",
        description="For each model and ClickMe image: the Spearman correlation, Dice and IoU between the "
                    "model's saliency (|gradient of the true-class logit|, max over channels; or SmoothGrad) "
                    "and the human map; the human-alignment score is the mean Spearman / 0.65753. Writes "
                    "per-image and summary CSVs, a bar chart and panels; resumes an interrupted run.",
        epilog=f"Example: advalign-jax evaluate-clickme --config {HUMAN_CONFIG} --config.saliency=smoothgrad")
    hc.add_argument("--config", default=HUMAN_CONFIG,
                    help=f"config FILE.py[:VARIANT] (default {HUMAN_CONFIG}); override with --config.KEY=VALUE")
    hc.add_argument("--no-progress", action="store_true", help="no progress bar")
    hc.set_defaults(func=run_evaluate_clickme)


def run_evaluate(args: argparse.Namespace) -> int:
    config = job_config(args)
    summary = aa.evaluate(config, progress=not args.no_progress)
    if not lead():
        return 0
    print(aa.format_summary(summary))
    print(f"results: {os.path.join(config.workdir, 'summary.csv')} (per-image CSVs in "
          f"{os.path.join(config.workdir, 'per_image')}, plot tolerance_vs_alignment.png, panels/)")
    return 0


def run_evaluate_clickme(args: argparse.Namespace) -> int:
    config = job_config(args)
    summary = ha.evaluate(config, progress=not args.no_progress)
    if not lead():
        return 0
    print(ha.format_summary(summary))
    print(f"results: {os.path.join(config.workdir, 'summary.csv')}")
    return 0
