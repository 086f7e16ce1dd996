"""The embedded demonstration models (``advalign-jax train``): a small CNN on synthetic ClickMe, at 64 px.

Three models whose reliance on the spurious cue is known by construction (docs/demonstration.md):

- ``vanilla``: cross-entropy on shards whose corner patch shows the label's colour 91% of the time
  (``data/synth``): the shortcut is there to take;
- ``randomcue``: cross-entropy on the same images with the patch colour drawn independently of the
  label (``data/synth_randomcue``): the patch carries no information, only the shape does;
- ``harmonized``: the neural harmonizer's loss on the shortcut data (``data/synth``): the human maps
  mark the shape and never the patch.

Commands (``scripts/train_demo_models.sh`` runs all of them and copies the models into ``checkpoints/``)::

    advalign-jax data synth --config configs/synthetic_clickme.py:train --out data/synth
    advalign-jax data synth --config configs/synthetic_clickme.py:train_randomcue --out data/synth_randomcue
    advalign-jax train --config configs/demo.py:vanilla
    advalign-jax train --config configs/demo.py:randomcue
    advalign-jax train --config configs/demo.py:harmonized

Other training seeds: ``--config.seed=S --config.data.seed=S --config.workdir=results/demo_VARIANT_sS``
(``scripts/demo_seed_study.sh``). Expected result: about 5 minutes per plain model and 15 for the
harmonized one on a 2-core CPU; ``results/demo_VARIANT/model``, ``metrics.csv`` with the final
``eval_accuracy`` on the embedded (cue-random) validation shard: docs/demonstration.md has the measured
numbers.

Variants (``:ARG``):
  vanilla     the default: cross-entropy on the shortcut shards (``data/synth``).
  randomcue   cross-entropy on the cue-random shards (``data/synth_randomcue``).
  harmonized  the neural harmonizer's loss (lambda 1) on the shortcut shards; the reference's signed channel
              mean, or --config.objective.saliency=mean_abs / absmax (docs/demonstration.md compares them).
  rrr         right for the right reasons (lambda_rrr 1e-3, the soft mask 1 - map) on the shortcut shards:
              the squared input-gradient of the log-probabilities off the human map.
  pgd         PGD adversarial training (the ``robustness`` library's attack: L2 eps 0.25, 5 steps of 0.0625,
              the best iterate) on the shortcut shards.
  trades      TRADES (L2 eps 0.25, 5 steps, beta 6) on the shortcut shards.
  runlocal    a few steps on 64-px images, for tests.

The model is ``small_cnn`` at 64 px with a 4x4 patch stem (64 -> 16 -> 8 -> 4 before pooling). Images
are read at 64 px (the embedded and training shards are 256-px JPEGs, resized by the reader as for
evaluation). Human maps go through the harmonization loader's pipeline
(``data.heatmap_pipeline='harmonization'``), then min-max normalisation, as in the harmonizer's
training code.
"""

import ml_collections

from advalign_jax.data import embedded_files
from advalign_jax.data.config_block import data_block
from advalign_jax.training.config_blocks import (model_block, objective_block, optimizer_block, schedule_block,
                                                 trainer_fields)

IMAGE_SIZE = 64
RRR_LAMBDA = 1e-3  # the squared log-probability gradient off the map is ~4e4 per image for vanilla
TRAIN_FILES = {"vanilla": "data/synth/train-*.tfrecords", "harmonized": "data/synth/train-*.tfrecords",
               "rrr": "data/synth/train-*.tfrecords", "randomcue": "data/synth_randomcue/train-*.tfrecords"}


def get_config(arg: str = "vanilla"):
    c = ml_collections.ConfigDict()
    c.model = model_block("small_cnn", num_classes=10, input_size=IMAGE_SIZE, patch=4)
    c.data_kind = "clickme"
    c.data = data_block(files=(TRAIN_FILES.get(arg, TRAIN_FILES["vanilla"]),), batch_size=64, mode="train",
                        num_classes=10, image_size=IMAGE_SIZE, shuffle_buffer=2000, crop_area_range=(0.5, 1.0))
    c.eval_data = data_block(files=tuple(embedded_files("val")), batch_size=64, mode="eval", num_classes=10,
                             image_size=IMAGE_SIZE)
    c.objective = objective_block("ce")
    c.optimizer = optimizer_block("adamw", weight_decay=1e-4)
    c.schedule = schedule_block("cosine", base_lr=3e-3, warmup_epochs=1.0)
    trainer_fields(c, workdir=f"results/demo_{arg}")
    c.total_steps = 3000  # 96 epochs of 2000 images
    c.steps_per_epoch = 32
    c.checkpoint_every = 500
    c.log_every = 50
    if arg in ("vanilla", "randomcue"):
        pass
    elif arg == "harmonized":
        c.objective = objective_block("harmonizer", lambda_harmonization=1.0, pyramid_levels=5, saliency="mean")
    elif arg == "rrr":
        c.objective = objective_block("rrr", lambda_rrr=RRR_LAMBDA)
    elif arg == "pgd":
        c.objective = objective_block("adversarial")
        c.objective.adversarial.update(dict(constraint="l2", eps=0.25, step_size=0.0625, steps=5))
    elif arg == "trades":
        c.objective = objective_block("trades")
        c.objective.adversarial.update(dict(constraint="l2", eps=0.25, steps=5, beta=6.0))
    elif arg == "runlocal":
        c.data.batch_size = 8
        c.total_steps = 6
        c.steps_per_epoch = 3
        c.checkpoint_every = 3
        c.log_every = 2
    else:
        raise ValueError(f"unknown variant {arg!r}: use vanilla, randomcue, harmonized, rrr, pgd, trades or runlocal")
    return c
