"""The adversarial training recipes of the released robust models, as config builders
(``configs/adversarial_*.py``, ``configs/trades_cifar10_wrn.py``).

Every value and where it comes from:

- **The ``robustness`` library** (MadryLab/robustness ``robustness/defaults.py``, ``train.py``; its README
  table of ResNet-50 models): CIFAR-10: 150 epochs, batch 128, SGD lr 0.1, momentum 0.9 (no Nesterov),
  weight decay 5e-4 (PyTorch's, coupled, on every parameter), lr x0.1 every 50 epochs; 7 attack steps, no
  random start, the best iterate; the training step sizes are not in the README: L2 ``eps / 5`` and Linf
  0.01 with 7 steps are the maintainer's (robustness issue #25); CIFAR normalisation inside the model
  (mean 0.4914, 0.4822, 0.4465, std 0.2023, 0.1994, 0.2010); augmentation RandomCrop(32, padding=4) and
  flip (here inside the loss, ``objective.augment_padding``; the library also applies ColorJitter(0.25,
  0.25, 0.25) and RandomRotation(2), which these recipes do not); a clean and an adversarial validation
  pass every 5 epochs. ImageNet L2 eps 3: 7 steps of 0.5, batch 256, weight decay 1e-4, lr 0.1 with 10x
  drops at epochs 30 and 60 (robust_representations issue #8), 90 epochs; random-resized crops and flips
  (the reader's; the library also jitters colour and lighting). Published (PGD-20 at the training eps):
  CIFAR-10 L2 0.5: 90.83% clean, 70.17% robust; Linf 8/255: 87.03% / 53.49%; ImageNet L2 3: 57.90% /
  35.16%.
- **TRADES** (yaodongyu/TRADES ``train_trades_cifar10.py``): WideResNet-34-10 without input normalisation,
  batch 128, SGD lr 0.1, momentum 0.9, weight decay 2e-4, 76 epochs with the lr x0.1 from (1-indexed)
  epoch 75 (its later decays at 90 and 100 are never reached), eps 0.031, 10 steps of 0.007, beta 6;
  RandomCrop(32, padding=4) and flip; evaluation PGD-20 of step 0.003 with a uniform random start.
  Published: 84.92% clean, 53.08% under AutoAttack (standard, Linf 8/255).

``arg='runlocal'`` keeps a recipe's wiring on a narrow copy of its network, 32-px synthetic images and a
few CPU steps (the tests run it); the recipes themselves run on TFDS data a user has.
"""

from __future__ import annotations

import math

import ml_collections

from advalign_jax.data import embedded_files
from advalign_jax.data.config_block import data_block
from advalign_jax.training.recipes import runlocal_arrays
from advalign_jax.training.config_blocks import (arrays_block, eval_attack_block, model_block, objective_block,
                                                 optimizer_block, schedule_block, trainer_fields)

CIFAR10_TRAIN = 50_000
IMAGENET_TRAIN = 1_281_167
ROBUSTNESS_CIFAR = {"l2": dict(constraint="l2", eps=0.5, step_size=0.1),
                    "linf": dict(constraint="linf", eps=8 / 255, step_size=0.01)}


def _runlocal_arrays(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    runlocal_arrays(c)
    c.objective.adversarial.steps = 2
    return c


def robustness_cifar10_recipe(arg: str = "l2") -> ml_collections.ConfigDict:
    """The ``robustness`` library's CIFAR-10 ResNet-50 (module docstring); ``arg``: ``l2`` (eps 0.5),
    ``linf`` (eps 8/255) or ``runlocal``."""
    if arg not in ("l2", "linf", "runlocal"):
        raise ValueError(f"unknown variant {arg!r}: use l2, linf or runlocal")
    threat = ROBUSTNESS_CIFAR["l2" if arg == "runlocal" else arg]
    c = ml_collections.ConfigDict()
    c.model = model_block("cifar_resnet50", num_classes=10, norm="cifar10")
    c.data_kind = "arrays"
    c.arrays = arrays_block("tfds:cifar10")
    c.data = ml_collections.ConfigDict({"batch_size": 128})
    c.objective = objective_block("adversarial", augment_padding=4, augment_fill=0.0)
    c.objective.adversarial.update(dict(**threat, steps=7, random_start=False, use_best=True))
    c.optimizer = optimizer_block("sgd", momentum=0.9, nesterov=False, weight_decay=5e-4, decay_exclude=())
    c.schedule = schedule_block("warmup_step", base_lr=0.1, warmup_epochs=0.0, boundaries=(50.0, 100.0),
                                factors=(0.1, 0.01))
    norm = threat["constraint"]
    c.eval_attack = eval_attack_block(norm=norm, eps=threat["eps"], steps=20, step_size=2.5 / 20, relative_step=True,
                                      random_start="none", start_radius=0.0)
    trainer_fields(c, workdir=f"results/adversarial_cifar10_resnet50_{arg}")
    c.steps_per_epoch = CIFAR10_TRAIN // 128
    c.total_steps = 150 * c.steps_per_epoch
    c.eval_every = 5 * c.steps_per_epoch
    c.checkpoint_every = c.steps_per_epoch
    c.log_every = 50
    if arg == "runlocal":
        c.model.options.widths = (8, 16, 16, 16)
        c.model.options.stage_sizes = (1, 1, 1, 1)
        _runlocal_arrays(c)
    return c


def robustness_imagenet_recipe(arg: str = "l2") -> ml_collections.ConfigDict:
    """The ``robustness`` library's ImageNet ResNet-50 at L2 eps 3 (module docstring): ImageNet from TFDS
    through the reader's training stream; ``runlocal``: the embedded shard at 32 px."""
    if arg not in ("l2", "runlocal"):
        raise ValueError(f"unknown variant {arg!r}: use l2 or runlocal")
    c = ml_collections.ConfigDict()
    c.model = model_block("resnet50", num_classes=1000)
    c.data_kind = "clickme"
    c.data = data_block(files=(), batch_size=256, mode="train", num_classes=1000, clickme_weight=0.0,
                        mix_sources=("tfds:imagenet2012:train",), mix_weights=(1.0,), shuffle_buffer=4096,
                        minmax_maps=False)
    c.eval_data = data_block(files=(), batch_size=256, mode="eval", num_classes=1000)
    c.objective = objective_block("adversarial")
    c.objective.adversarial.update(dict(constraint="l2", eps=3.0, step_size=0.5, steps=7, random_start=False,
                                        use_best=True))
    c.optimizer = optimizer_block("sgd", momentum=0.9, nesterov=False, weight_decay=1e-4, decay_exclude=())
    c.schedule = schedule_block("warmup_step", base_lr=0.1, warmup_epochs=0.0, boundaries=(30.0, 60.0),
                                factors=(0.1, 0.01))
    trainer_fields(c, workdir=f"results/adversarial_imagenet_resnet50_{arg}")
    c.steps_per_epoch = math.ceil(IMAGENET_TRAIN / 256)
    c.total_steps = 90 * c.steps_per_epoch
    c.log_every = 100
    c.checkpoint_every = 2000
    c.eval_every = 0
    c.dtype = "bfloat16"
    if arg == "runlocal":
        from_embedded(c)
    return c


def from_embedded(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A ClickMe-stream recipe on the embedded shard: 10 classes, 32 px, one block per stage, 2 CPU steps."""


    c.model.options.num_classes = 10
    c.model.options.input_size = 32
    c.model.options.layers = (1, 1, 1, 1)
    c.data.files = tuple(embedded_files("val"))
    c.data.num_classes = 10
    c.data.image_size = 32
    c.data.batch_size = 8
    c.data.clickme_weight = 1.0
    c.data.mix_sources = ()
    c.data.mix_weights = ()
    c.data.shuffle_buffer = 64
    c.eval_data.num_classes = 10
    c.total_steps = 2
    c.steps_per_epoch = 1
    c.log_every = 1
    c.checkpoint_every = 2
    c.dtype = "float32"
    c.objective.adversarial.steps = 2
    return c


def trades_cifar10_recipe(arg: str = "trades") -> ml_collections.ConfigDict:
    """TRADES's CIFAR-10 WideResNet-34-10 (module docstring); ``runlocal``: a WRN-10-1."""
    if arg not in ("trades", "runlocal"):
        raise ValueError(f"unknown variant {arg!r}: use trades or runlocal")
    c = ml_collections.ConfigDict()
    c.model = model_block("wrn34_10", num_classes=10)
    c.data_kind = "arrays"
    c.arrays = arrays_block("tfds:cifar10")
    c.data = ml_collections.ConfigDict({"batch_size": 128})
    c.objective = objective_block("trades", augment_padding=4, augment_fill=0.0)
    c.objective.adversarial.update(dict(constraint="linf", eps=0.031, step_size=0.007, steps=10, beta=6.0))
    c.optimizer = optimizer_block("sgd", momentum=0.9, nesterov=False, weight_decay=2e-4, decay_exclude=())
    # lr x0.1 from 1-indexed epoch 75 = 74 epochs from 0; 76 epochs in all
    c.schedule = schedule_block("warmup_step", base_lr=0.1, warmup_epochs=0.0, boundaries=(74.0,), factors=(0.1,))
    c.eval_attack = eval_attack_block(norm="linf", eps=0.031, steps=20, step_size=0.003, relative_step=False,
                                      random_start="box", start_radius=0.031)
    trainer_fields(c, workdir=f"results/trades_cifar10_wrn34_10_{arg}")
    c.steps_per_epoch = CIFAR10_TRAIN // 128
    c.total_steps = 76 * c.steps_per_epoch
    c.eval_every = 5 * c.steps_per_epoch
    c.checkpoint_every = c.steps_per_epoch
    c.log_every = 50
    if arg == "runlocal":
        c.model.options.depth = 10
        c.model.options.widen_factor = 1
        _runlocal_arrays(c)
    return c
