"""PAG's official CIFAR-10 ViT recipe (``advalign-jax train``): the ResNet-18 recipe
(:func:`advalign_jax.training.recipes.pag_cifar10_recipe`) with the CIFAR ViT (4x4 patches, width 384,
7 pre-LN layers) and pag_coeff 2.0 for the first 50 epochs, then 3.0 (weights 20 and 30 here).

Commands (CIFAR-10 prepared once with ``tfds build cifar10 --data_dir /data/tfds``)::

    advalign-jax train --config configs/pag_cifar10_vit.py:nn --config.arrays.data_dir=/data/tfds
    advalign-jax train --config configs/pag_cifar10_vit.py:sbg --config.arrays.data_dir=/data/tfds \\
        --config.objective.targets_file=/data/pag/c10_sbg.pt

Expected result: a clearly non-zero AutoAttack L2 robust accuracy with score-based targets, where a
vanilla ViT has none (the paper's ViT table has the exact numbers; this project has not trained it).
``eval_robust_accuracy`` in ``metrics.csv`` is the official per-epoch PGD check. A GPU run.

Variants (``:ARG``):
  nn          the default: Nearest-Neighbour targets among all training images of the class.
  oi          One-Image targets.
  cm          Class-Mean targets (automatic scale).
  sbg         precomputed targets (the official score-based ones): objective.targets_file.
  runlocal    a few CPU steps on 32-px synthetic images (the wiring only; tests run it).
"""

from advalign_jax.training.recipes import pag_cifar10_recipe


def get_config(arg: str = "nn"):
    return pag_cifar10_recipe("cifar_vit", arg, pag_weight=30.0, warm_weight=20.0, warm_epochs=50)
