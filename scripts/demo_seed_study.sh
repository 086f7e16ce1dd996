#!/usr/bin/env bash
# The demonstration over training seeds: trains the three demo models for each seed
# (scripts/train_demo_models.sh; seed 0 is the shipped one), evaluates each seed's three models on the
# same images with `advalign-jax evaluate` and `advalign-jax evaluate-clickme`, and prints the per-seed
# tables (scripts/demo_seed_study.py) that docs/demonstration.md reports.
#
# Usage (inside the venv):
#   bash scripts/demo_seed_study.sh                  # seeds 0 1 2 on the embedded validation shard
#   bash scripts/demo_seed_study.sh 0 1 2 3 4        # more seeds
#   STUDY=results/seed_study_1000 DATA=data/synth_val1000/val-0.tfrecords bash scripts/demo_seed_study.sh
#     (another evaluation set, e.g. `advalign-jax data synth --config configs/synthetic_clickme.py:val
#      --config.num_images=1000 --out data/synth_val1000`: its first 128 images are the embedded ones)
#
# About 25 minutes of training per seed and 3 of evaluation on the embedded shard, on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ ${#seeds[@]} -eq 0 ] && seeds=(0 1 2)
study="${STUDY:-results/seed_study}"
data=()
[ -n "${DATA:-}" ] && data=(--config.data.files="('${DATA}',)")
bash scripts/train_demo_models.sh "${seeds[@]}"
for seed in "${seeds[@]}"; do
  dir="results/demo_models/s${seed}"
  models="('small_cnn=${dir}/small_cnn_vanilla', 'small_cnn=${dir}/small_cnn_randomcue', 'small_cnn=${dir}/small_cnn_harmonized')"
  advalign-jax evaluate --config configs/adversarial_alignment.py --no-progress --config.models="${models}" \
    --config.workdir="${study}/s${seed}/adversarial_alignment" "${data[@]}"
  advalign-jax evaluate-clickme --config configs/human_alignment.py --no-progress --config.models="${models}" \
    --config.workdir="${study}/s${seed}/human_alignment" "${data[@]}"
done
python scripts/demo_seed_study.py "${study}"
