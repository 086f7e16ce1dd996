"""The ``robustness`` library's CIFAR-10 ResNet-50 by PGD adversarial training (``advalign-jax train``);
every value and where it comes from: :mod:`advalign_jax.training.adversarial_recipes`.

Commands (CIFAR-10 prepared once with ``tfds build cifar10 --data_dir /data/tfds``)::

    advalign-jax train --config configs/adversarial_cifar10_resnet50.py:l2 --config.arrays.data_dir=/data/tfds
    advalign-jax train --config configs/adversarial_cifar10_resnet50.py:linf --config.arrays.data_dir=/data/tfds
    advalign-jax evaluate-robust --config configs/robustness.py --config.data.data_dir=/data/tfds \\
        --config.model_dir=results/adversarial_cifar10_resnet50_l2/model --config.attacks="('pgd-l2',)"

Expected result (the library's README, PGD-20 at the training eps): L2 eps 0.5: 90.83% clean, 70.17%
robust; Linf eps 8/255: 87.03% clean, 53.49% robust. ``eval_robust_accuracy`` in ``metrics.csv`` (every 5
epochs) is that PGD-20. About 150 epochs x 390 steps of 8 forward-backward passes: a GPU run (not run to
completion here). Differences from the library: no ColorJitter or RandomRotation(2) (crop and flip only),
the last partial batch of an epoch dropped.

Recipe: ResNet-50 of ``robustness/cifar_models`` with the CIFAR normalisation inside, batch 128, SGD 0.1,
momentum 0.9, weight decay 5e-4, 150 epochs, lr x0.1 at epochs 50 and 100; the attack 7 steps (L2 of eps / 5,
Linf of 0.01), no random start, the best iterate, in inference mode.

Variants (``:ARG``):
  l2          L2, eps 0.5 (the default).
  linf        Linf, eps 8/255.
  runlocal    a narrow copy (one block per stage, widths 8-16) for two CPU steps on 32-px synthetic images.
"""

from advalign_jax.training.adversarial_recipes import robustness_cifar10_recipe


def get_config(arg: str = "l2"):
    return robustness_cifar10_recipe(arg)
