"""The embedded demonstration models (``advalign-jax train``): a small CNN on synthetic ClickMe.

Commands (the shards come from ``advalign-jax data synth --config configs/synthetic_clickme.py:train
--out data/synth``; ``scripts/train_demo_models.sh`` runs everything and copies the results into
``checkpoints/``)::

    advalign-jax train --config configs/demo.py:vanilla
    advalign-jax train --config configs/demo.py:harmonized

Expected result: about 12 minutes each on a 2-core CPU; the exported models in
``results/demo_{vanilla,harmonized}/model``. The training data's background tint matches the label 91%
of the time; the embedded validation shard's tint is drawn independently of the label, so its accuracy
shows how much each model took the tint shortcut (docs/demonstration.md has the measured numbers).

Variants (``:ARG``):
  vanilla     cross-entropy only.
  harmonized  the same budget with the neural harmonizer's loss (lambda 0.2, 5 pyramid levels).
  runlocal    a few steps on 64-px images, for tests.

Human maps go through the harmonization loader's pipeline (``data.heatmap_pipeline='harmonization'``),
then min-max normalisation, as in the harmonizer's training code.
"""

import ml_collections

from advalign_jax.data import embedded_files
from advalign_jax.data.config_block import data_block
from advalign_jax.training.config_blocks import (model_block, objective_block, optimizer_block, schedule_block,
                                                 trainer_fields)


def get_config(arg: str = "vanilla"):
    c = ml_collections.ConfigDict()
    c.model = model_block("small_cnn", num_classes=10)
    c.data_kind = "clickme"
    c.data = data_block(files=("data/synth/train-*.tfrecords",), batch_size=32, mode="train", num_classes=10,
                        shuffle_buffer=512, crop_area_range=(0.5, 1.0))
    c.eval_data = data_block(files=tuple(embedded_files("val")), batch_size=64, mode="eval", num_classes=10)
    c.objective = objective_block("ce")
    c.optimizer = optimizer_block("adamw", weight_decay=1e-4)
    c.schedule = schedule_block("cosine", base_lr=2e-3, warmup_epochs=0.5)
    trainer_fields(c, workdir=f"results/demo_{arg}")
    c.total_steps = 1200  # about 19 epochs of 2000 images
    c.steps_per_epoch = 63
    c.checkpoint_every = 200
    c.log_every = 20
    if arg == "vanilla":
        pass
    elif arg == "harmonized":
        c.objective = objective_block("harmonizer", lambda_harmonization=0.2, pyramid_levels=5, saliency="mean")
    elif arg == "runlocal":
        c.data.image_size = 64
        c.data.batch_size = 8
        c.eval_data.image_size = 64
        c.total_steps = 6
        c.steps_per_epoch = 3
        c.checkpoint_every = 3
        c.log_every = 2
    else:
        raise ValueError(f"unknown variant {arg!r}: use vanilla, harmonized or runlocal")
    return c
