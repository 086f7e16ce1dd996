"""The ``robustness`` library's ImageNet ResNet-50 at L2 eps 3 by PGD adversarial training (``advalign-jax
train``): the robust model of the neural-sensitivity study and of robust-feature image synthesis; every
value and where it comes from: :mod:`advalign_jax.training.adversarial_recipes`.

Commands (ImageNet prepared once for TFDS: ``tfds build imagenet2012 --data_dir /data/tfds`` with the
archives in its manual folder)::

    advalign-jax train --config configs/adversarial_imagenet_resnet50.py --config.data.tfds_data_dir=/data/tfds

A multi-GPU node runs it data-parallel on every local device; a pod, with ``--config.distributed=true``
(README, "Multi-host runs").

Expected result (the library's README, PGD-20 at eps 3): 57.90% clean, 35.16% robust top-1 on the
validation set (``advalign-jax evaluate-robust`` with ``--config.data.source=tfds:imagenet2012
--config.data.split=validation --config.eps.l2=3.0``). 90 epochs x 5,005 steps of 8 forward-backward
passes at batch 256: days on a multi-GPU node (not run here). Differences from the library: no colour
jitter or PCA lighting noise (random-resized crops and flips only).

Recipe: torchvision's ResNet-50 with the ImageNet normalisation inside, batch 256, SGD 0.1, momentum 0.9,
weight decay 1e-4, lr x0.1 at epochs 30 and 60; the attack 7 L2 steps of 0.5, no random start, the best
iterate, in inference mode; ImageNet streamed from TFDS by the reader's training pipeline (no ClickMe
files: ``data.clickme_weight=0``), bfloat16 compute.

Variants (``:ARG``):
  l2          the recipe (the default).
  runlocal    one block per stage for two CPU steps on the embedded shard at 32 px (the wiring only).
"""

from advalign_jax.training.adversarial_recipes import robustness_imagenet_recipe


def get_config(arg: str = "l2"):
    return robustness_imagenet_recipe(arg)
