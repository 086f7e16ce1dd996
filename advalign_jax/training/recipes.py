"""The harmonization recipe of the released models, as a config builder (``configs/harmonize_*.py``).

From the harmonization paper (Fel et al. 2022, "Harmonizing the object recognition strategies of deep
neural networks with humans", its training section) and serre-lab/Harmonization's training code: SGD with Nesterov
momentum 0.9; linear warm-up over 5 epochs, the rate x0.1 at epoch 30, x0.01 at 60, x0.001 at 80;
global batch 1024 (256 for ViT); 224 px; ClickMe (token 1) and ImageNet (token 0, zero map) sampled
20% / 80% with one random-resized crop and flip shared by image and map; min-max normalised maps;
label smoothing 0.1; human maps through the harmonization loader's resize-blur-resize
(``data.heatmap_pipeline='harmonization'``); an L2 term 1e-5 on the weights outside normalisation layers; the harmonization
weight lambda (1.0 in the package, 2.0 and a base rate of 0.7 in the lab's training code, whose values
are the defaults here; the released checkpoints' per-model values are not published). Training
fine-tunes a checkpoint of the model zoo (``model.init_from``), as the lab did.

An "epoch" is 1,281,167 examples (one ImageNet pass) at the global batch size.
"""

from __future__ import annotations

import math

import ml_collections

from advalign_jax.data import embedded_files
from advalign_jax.data.config_block import data_block
from advalign_jax.training.config_blocks import (arrays_block, eval_attack_block, model_block, objective_block,
                                                 optimizer_block, schedule_block, trainer_fields)

IMAGENET_TRAIN = 1_281_167


def runlocal_arrays(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An array-data recipe's tiny local mode: 64 synthetic 32-px training images (16 to evaluate),
    batch 8, two steps, a 2-step evaluation attack (the wiring only; the tests run it)."""
    c.arrays.source = "synthetic"
    c.arrays.limit = 64
    c.arrays.eval_limit = 16
    c.data.batch_size = 8
    c.steps_per_epoch = 4
    c.total_steps = 2
    c.eval_every = 0
    c.checkpoint_every = 2
    c.log_every = 1
    c.eval_attack.steps = 2
    return c


def harmonization_recipe(arch: str, arg: str = "", batch_size: int = 1024, base_lr: float = 0.7,
                         epochs: int = 200, **model_options) -> ml_collections.ConfigDict:
    """The recipe for ``arch``; ``arg='runlocal'`` gives a few CPU steps on the embedded shard."""
    c = ml_collections.ConfigDict()
    c.model = model_block(arch, num_classes=1000, **model_options)
    c.data_kind = "clickme"
    c.data = data_block(files=("clickme/train-*.tfrecords",), batch_size=batch_size, mode="train",
                        num_classes=1000, clickme_weight=0.2, mix_sources=("tfds:imagenet2012:train",),
                        mix_weights=(0.8,), shuffle_buffer=4096)
    c.eval_data = data_block(files=("clickme/val-*.tfrecords",), batch_size=256, mode="eval", num_classes=1000)
    c.objective = objective_block("harmonizer", lambda_harmonization=2.0, pyramid_levels=5, saliency="mean",
                                  label_smoothing=0.1, weight_decay=1e-5)
    c.optimizer = optimizer_block("sgd", momentum=0.9, nesterov=True)
    c.schedule = schedule_block("warmup_step", base_lr=base_lr, warmup_epochs=5.0,
                                boundaries=(30.0, 60.0, 80.0), factors=(0.1, 0.01, 0.001))
    trainer_fields(c, workdir=f"results/harmonize_{arch}")
    c.steps_per_epoch = math.ceil(IMAGENET_TRAIN / batch_size)
    c.total_steps = epochs * c.steps_per_epoch
    c.log_every = 100
    c.checkpoint_every = 2000
    c.eval_every = 10 * c.steps_per_epoch
    c.dtype = "bfloat16"
    if arg == "runlocal":
        c.model.options.num_classes = 10
        c.model.options.input_size = 32
        c.data.files = tuple(embedded_files("val"))
        c.data.num_classes = 10
        c.data.image_size = 32
        c.data.batch_size = 8
        c.data.clickme_weight = 1.0
        c.data.mix_sources = ()
        c.data.mix_weights = ()
        c.data.shuffle_buffer = 64
        c.eval_data.files = ()
        c.eval_data.num_classes = 10
        c.total_steps = 2
        c.steps_per_epoch = 1
        c.log_every = 1
        c.checkpoint_every = 2
        c.eval_every = 0
        c.dtype = "float32"
        c.schedule.base_lr = 0.01
    elif arg:
        raise ValueError(f"unknown variant {arg!r}: use runlocal or nothing")
    return c


CIFAR10_TRAIN = 50_000
PAG_SOURCES = {"nn": "nearest_neighbour", "oi": "one_image", "cm": "class_mean", "sbg": "precomputed"}


def pag_cifar10_recipe(arch: str, arg: str = "nn", pag_weight: float = 15.0, warm_weight: float = 0.0,
                       warm_epochs: int = 0) -> ml_collections.ConfigDict:
    """The official PAG CIFAR-10 recipe (royg27/PAG-ROB ``TRAIN_CIFAR10.py``): SGD momentum 0.9
    (no Nesterov) with PyTorch's coupled weight decay 1e-4 on every parameter, lr 0.01 then x0.1 at
    epoch 50, x0.01 at 75 (x0.001 at 100: the last epoch ends there), 100 epochs of batch 64, seed
    3407; crop 32 with padding 4 (fill 0 in the official [-1, 1] frame, 0.5 here in [0, 1]) and flip,
    inside the loss; all 10 classes as targets, ``1 - mean cos`` times ``pag_weight`` (= 10 x
    pag_coeff); the official per-epoch evaluation (untargeted L2 PGD, eps 0.5, 7 steps of 1.5 eps / 7,
    random start, last iterate) on the 10,000 test images.

    ``arg`` picks the target gradients: ``nn`` (nearest neighbour among all training images of the
    class), ``oi``, ``cm``, or ``sbg`` (the official precomputed score-based targets: set
    ``objective.targets_file`` to ``c10_sbg.pt``-style files or an ``advalign-jax targets`` output);
    ``runlocal`` runs a few CPU steps on 32-px synthetic images (the wiring only; tests run it).
    """
    c = ml_collections.ConfigDict()
    c.model = model_block(arch, num_classes=10)
    c.data_kind = "arrays"
    c.arrays = arrays_block("tfds:cifar10")
    c.data = ml_collections.ConfigDict({"batch_size": 64})
    source = PAG_SOURCES.get(arg, "nearest_neighbour")
    c.objective = objective_block("pag", pag_weight=pag_weight, reduction="mean", num_targets=0,
                                  semantics="shared", target_source=source, augment_padding=4, augment_fill=0.5,
                                  targets_file="c10_sbg.pt" if source == "precomputed" else "")
    c.optimizer = optimizer_block("sgd", momentum=0.9, nesterov=False, weight_decay=1e-4, decay_exclude=())
    c.schedule = schedule_block("warmup_step", base_lr=0.01, warmup_epochs=0.0, boundaries=(50.0, 75.0, 100.0),
                                factors=(0.1, 0.01, 0.001))
    c.eval_attack = eval_attack_block()
    trainer_fields(c, workdir=f"results/pag_cifar10_{arch}_{arg}")
    c.steps_per_epoch = CIFAR10_TRAIN // 64
    c.total_steps = 100 * c.steps_per_epoch
    c.eval_every = c.steps_per_epoch
    c.checkpoint_every = c.steps_per_epoch
    c.log_every = 50
    c.seed = 3407
    if warm_epochs:
        c.objective.warm_steps = warm_epochs * c.steps_per_epoch
        c.objective.warm_weight = warm_weight
    if arg == "runlocal":
        runlocal_arrays(c)
        if warm_epochs:
            c.objective.warm_steps = 1
    elif arg not in PAG_SOURCES:
        raise ValueError(f"unknown variant {arg!r}: use nn, oi, cm, sbg or runlocal")
    return c
