"""TRADES's CIFAR-10 WideResNet-34-10 (``advalign-jax train``); every value and where it comes from:
:mod:`advalign_jax.training.adversarial_recipes`.

Commands (CIFAR-10 prepared once with ``tfds build cifar10 --data_dir /data/tfds``)::

    advalign-jax train --config configs/trades_cifar10_wrn.py --config.arrays.data_dir=/data/tfds
    advalign-jax evaluate-robust --config configs/robustness.py --config.data.data_dir=/data/tfds \\
        --config.model_dir=results/trades_cifar10_wrn34_10_trades/model --config.attacks="('autoattack-linf',)"

Expected result (the released model): 84.92% clean, 53.08% robust under AutoAttack (standard, Linf
8/255); ``eval_robust_accuracy`` in ``metrics.csv`` (every 5 epochs) is TRADES's PGD-20 (step 0.003,
uniform random start). 76 epochs x 390 steps of 13 forward-backward passes: a GPU run (not run here).
A released TRADES checkpoint imports with ``advalign-jax convert --arch wrn34_10 --from model-wideres-epoch76.pt``.

Recipe: WideResNet-34-10 without input normalisation, batch 128, SGD 0.1, momentum 0.9, weight decay 2e-4,
76 epochs with the lr x0.1 for the last two; crop (padding 4) and flip; the inner attack Linf eps 0.031,
10 steps of 0.007 on the KL to the clean prediction from x + 0.001 N(0, I), beta 6.

Variants (``:ARG``):
  trades      the recipe (the default).
  runlocal    a WRN-10-1 for two CPU steps on 32-px synthetic images (the wiring only).
"""

from advalign_jax.training.adversarial_recipes import trades_cifar10_recipe


def get_config(arg: str = "trades"):
    return trades_cifar10_recipe(arg)
