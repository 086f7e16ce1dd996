"""``advalign-jax construct``: the robust-features datasets (det, rand, robust, non_robust)."""

from __future__ import annotations

import argparse
import os

from advalign_jax.cli.common import config_arguments, job_config, lead
from advalign_jax.synthesis import construct

DEFAULT_CONFIG = "configs/robust_features.py"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "construct", help="the datasets of 'Adversarial examples are not bugs, they are features'",
        description="From a trained model and a training set: det / rand (each image attacked towards (y + 1) mod C "
                    "or a random class on a standard model and relabelled to it) or robust / non_robust (each "
                    "image's penultimate representation of a robust or a standard model matched from another "
                    "training image, label kept). Writes dataset.npz and dataset.json (the recipe and the source "
                    "model's fingerprint) and items.csv in the workdir, which advalign-jax train reads as "
                    "--config.arrays.source=constructed:WORKDIR (its test split: the original one); resumes an "
                    "interrupted run.",
        epilog=f"Example: advalign-jax construct --config {DEFAULT_CONFIG}:runlocal")
    config_arguments(p, DEFAULT_CONFIG)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = job_config(args)
    meta = construct.construct(config, progress=not args.no_progress)
    if not lead():
        return 0
    reached = "target class reached" if meta["kind"] in ("det", "rand") else "matching loss below the seed image's"
    print(f"{meta['kind']}: {meta['num_examples']} images from {meta['model']['path']}; mean final loss "
          f"{meta['loss_mean']:.4g}, {reached} for {100 * meta['reached']:.1f}%")
    print(f"dataset: {os.path.join(config.workdir, 'dataset.npz')} (train on it with "
          f"--config.arrays.source=constructed:{config.workdir})")
    return 0
