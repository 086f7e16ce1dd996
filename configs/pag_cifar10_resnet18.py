"""PAG's CIFAR-10 ResNet-18 recipe (``advalign-jax train``), ours and the official code's; every value
and where it comes from: :func:`advalign_jax.training.recipes.pag_cifar10_recipe` and
:func:`advalign_jax.training.config_blocks.pag_official_semantics`.

Commands (CIFAR-10 prepared once with ``tfds build cifar10 --data_dir /data/tfds``)::

    advalign-jax train --config configs/pag_cifar10_resnet18.py:nn --config.arrays.data_dir=/data/tfds
    advalign-jax train --config configs/pag_cifar10_resnet18.py:official --config.arrays.data_dir=/data/tfds \\
        --config.objective.targets_file=/data/pag/c10_sbg_data.pt \\
        --config.objective.targets_labels_file=/data/pag/c10_sbg_label.pt

Expected result: the paper's lambda ablation with score-based targets gives AutoAttack robust accuracy
(L2 eps 0.5 / Linf 8/255) of 50.87% / 15.97% at lambda 1.0 and 55.39% / 23.97% at 2.0 (lambda 0: none),
so about 50-55% / 16-24% at this recipe's 1.5; heuristic targets (nn, oi, cm) give less. ``eval_robust_accuracy`` in
``metrics.csv`` is the official per-epoch PGD check; ``advalign-jax evaluate-robust`` gives AutoAttack's
white-box part. About 100 epochs x 781 steps; a GPU run, not a CPU one. Not run to completion here.

Both semantics share: SGD 0.01, momentum 0.9 without Nesterov, PyTorch's coupled weight decay 1e-4 on
every parameter; 100 epochs of 781 batches of 64 (the remainder dropped); seed 3407; all 10 classes as
targets with ``10 x 1.5 x (1 - mean cos)`` (``pag_weight`` 15); crop 32 with padding 4 (zero in the
official [-1, 1] frame, 0.5 here in [0, 1]) and flip inside the loss, the gradient taken w.r.t. the
un-augmented image; the official per-epoch evaluation (untargeted L2 PGD, eps 0.5, 7 steps of
1.5 eps / 7, random start, last iterate) on the 10,000 test images.

Where ours (``nn``, ``oi``, ``cm``, ``sbg``) differs from the official code (``royg27/PAG-ROB``
``TRAIN_CIFAR10.py``; the ``official`` variants):

=====================  ==========================================  ==========================================
                       ours                                        official (``*_official``)
=====================  ==========================================  ==========================================
learning rate          x0.1 from epoch 50, x0.01 from 75 (counted  x0.1 from 1-indexed epoch 50, x0.01 from
                       from 0): 50 epochs at 0.01, 25 at 1e-3, 25  75, x0.001 at 100: 49 epochs at 0.01, 25
                       at 1e-4                                     at 1e-3, 25 at 1e-4, the last at 1e-5
forward passes         one: the cross-entropy and all K input-     two: the cross-entropy on the batch, the
                       gradients from one pass (K cotangents       alignment term on a second pass over the
                       through one VJP); BatchNorm statistics of   batch replicated K = 10 times (640 rows);
                       the 64 images, updated once per step        BatchNorm statistics updated twice
crop and flip          one draw per image, shared by the cross-    one draw for the whole batch (torchvision
                       entropy and the alignment term              on a 4-D tensor), a separate draw for the
                                                                   cross-entropy pass and the alignment pass
training images        the TFDS training split; with ``sbg`` the   the target file's own images ([-1, 1])
                       target file must hold the same images in    and labels (``c10_sbg_data.pt``,
                       the same order (checked image by image)     ``c10_sbg_label.pt``)
=====================  ==========================================  ==========================================

Neither matches the official run draw for draw: its shuffling and random draws come from PyTorch's
generators (seed 3407), ours from JAX's and NumPy's.

Variants (``:ARG``):
  nn          the default: Nearest-Neighbour targets among all training images of the class.
  oi          One-Image targets.
  cm          Class-Mean targets (automatic scale).
  sbg         precomputed targets (e.g. score-based) for the TFDS training split: objective.targets_file.
  official    the official run: score-based targets from the official files, trained on their images
              and labels, with the official semantics above.
  nn_official, oi_official, cm_official, sbg_official, runlocal_official
              those targets with the official semantics (sbg_official = official).
  runlocal    a few CPU steps on 32-px synthetic images (the wiring only; tests run it).
"""

from advalign_jax.training.config_blocks import official_variant, pag_official_semantics
from advalign_jax.training.recipes import pag_cifar10_recipe


def get_config(arg: str = "nn"):
    base, official = official_variant(arg)
    c = pag_cifar10_recipe("cifar_resnet18", base, pag_weight=15.0)
    return pag_official_semantics(c) if official else c
