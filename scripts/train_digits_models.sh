#!/usr/bin/env bash
# Rebuilds the two digits checkpoints in checkpoints/ with this project's own code: the small CNN of
# configs/adversarial_digits.py on scikit-learn's bundled digits (16 px), trained with cross-entropy
# (checkpoints/digits_vanilla) and with PGD adversarial training at L2 eps 1.0 (checkpoints/digits_pgd_l2),
# seed 0. They are the standard and the robust source models of the offline robust-features
# demonstration (configs/robust_features.py:runlocal, configs/synthesize.py:runlocal).
#
# Usage (inside the venv, from anywhere):  bash scripts/train_digits_models.sh
# About 20 s for the vanilla model and 1-2 minutes for the adversarially trained one on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
for variant in vanilla pgd; do
  name=$([ "${variant}" = pgd ] && echo digits_pgd_l2 || echo digits_vanilla)
  advalign-jax train --config "configs/adversarial_digits.py:${variant}" --no-progress --config.seed=0 \
    --config.workdir="results/digits_models/${name}" --config.export_to="checkpoints/${name}"
  echo "checkpoints/${name} written"
done
