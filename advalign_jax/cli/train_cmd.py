"""``advalign-jax train``: the trainer, for every objective (cross-entropy, harmonizer, PAG, adversarial, TRADES)."""

from __future__ import annotations

import argparse
import json

from advalign_jax.cli.common import job_config, lead
from advalign_jax.training.trainer import train


def add_parser(sub) -> None:
    tr = sub.add_parser(
        "train", help="train or fine-tune a model (plain, harmonized, PAG, adversarial training, TRADES)",
        description="Train per a config under configs/: data-parallel on every device, orbax "
                    "checkpoints with exact resume (rerun the same command), metrics in metrics.csv and "
                    "TensorBoard, and a final model directory that `evaluate` loads.",
        epilog="Example: advalign-jax train --config configs/demo.py:vanilla --config.total_steps=100")
    tr.add_argument("--config", required=True, help="config FILE.py[:VARIANT]; override with --config.KEY=VALUE")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    config = job_config(args)
    result = train(config, progress=not args.no_progress)
    if not lead():
        return 0
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}, indent=1))
    return 0
