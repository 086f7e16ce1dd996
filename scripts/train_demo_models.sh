#!/usr/bin/env bash
# Rebuilds the demonstration checkpoints in checkpoints/ from scratch with this project's own code: the
# synthetic ClickMe training shards (the patch cue informative, and random), then the three small CNNs
# of configs/demo.py (vanilla, randomcue, harmonized) at 64 px.
#
# Usage (inside the venv, from anywhere):
#   bash scripts/train_demo_models.sh            # seed 0: trains and copies into checkpoints/
#   bash scripts/train_demo_models.sh 1 2        # other training seeds, kept in results/demo_models/sSEED/
#
# Seed 0 is the shipped one. About 5 minutes per plain model and 15 for the harmonized one on a 2-core
# CPU. A finished run is not retrained (rerunning resumes an interrupted one).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ ${#seeds[@]} -eq 0 ] && seeds=(0)
[ -f data/synth/train.json ] || advalign-jax data synth --config configs/synthetic_clickme.py:train --out data/synth --overwrite
[ -f data/synth_randomcue/train.json ] || advalign-jax data synth --config configs/synthetic_clickme.py:train_randomcue \
  --out data/synth_randomcue --overwrite
for seed in "${seeds[@]}"; do
  for variant in vanilla randomcue harmonized; do
    model="results/demo_models/s${seed}/small_cnn_${variant}"
    advalign-jax train --config "configs/demo.py:${variant}" --no-progress --config.seed="${seed}" \
      --config.data.seed="${seed}" --config.workdir="results/demo_${variant}_s${seed}" --config.export_to="${model}"
    if [ "${seed}" = 0 ]; then
      rm -rf "checkpoints/small_cnn_${variant}"
      cp -r "${model}" "checkpoints/small_cnn_${variant}"
      echo "checkpoints/small_cnn_${variant} written"
    fi
  done
done
