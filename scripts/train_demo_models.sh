#!/usr/bin/env bash
# Rebuilds the demonstration checkpoints in checkpoints/ from scratch with this project's own code:
# synthetic ClickMe training shards, then the plain and the harmonized small CNN with the same budget.
# About 25 minutes on a 2-core CPU.  Usage: bash scripts/train_demo_models.sh  (inside the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
advalign-jax data synth --config configs/synthetic_clickme.py:train --out data/synth --overwrite
for variant in vanilla harmonized; do
  rm -rf "results/demo_${variant}"
  advalign-jax train --config "configs/demo.py:${variant}" --no-progress
  rm -rf "checkpoints/small_cnn_${variant}"
  cp -r "results/demo_${variant}/model" "checkpoints/small_cnn_${variant}"
done
echo "checkpoints/small_cnn_vanilla and checkpoints/small_cnn_harmonized written"
