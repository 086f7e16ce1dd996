"""PAG's toy 2-D experiment (or any small array-data config) over many seeds, trained side by side.

    python scripts/pag_seed_sweep.py --seeds 16                        # vanilla and PAG, seeds 0-15
    python scripts/pag_seed_sweep.py --seeds 256 --out results/pag_toy2d_seeds_256
    python scripts/pag_seed_sweep.py --help

Each model's seeds are vmapped into one compiled program; seed s is what ``advalign-jax train
--config configs/pag_toy2d.py:VARIANT --config.seed=s`` trains (advalign_jax/training/seed_sweep.py).
Prints median, quartiles and range over the seeds of the test points kept under the config's
evaluation attack, counted two ways (kept_adversarial: the PAG paper's count; kept_robust: also correct
clean, the trainer's eval_robust_accuracy), and writes OUT/VARIANT/seed_S.csv (one row per test point),
OUT/summary.csv and OUT/distribution.csv. 16 seeds of both models take about 15 s on a 2-core CPU.
"""

import sys

from advalign_jax.training.seed_sweep_cmd import main

if __name__ == "__main__":
    sys.exit(main())
