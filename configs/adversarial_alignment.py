"""Adversarial alignment (``advalign-jax evaluate``): the smallest L2 attack that flips each model's
decision on ClickMe images, and how well it lines up with the human maps.

Command (the README's main job; under two minutes on a 2-core CPU)::

    advalign-jax evaluate --config configs/adversarial_alignment.py

Expected result: ``results/adversarial_alignment/summary.csv`` with one row per model (the three
embedded demonstration models at 64 px: a small CNN trained where a corner patch gives the label away,
the same trained with a random patch, and a harmonized one) with 95% bootstrap intervals and the
cue-swap test, ``comparison.csv`` (paired differences between the models on the same images),
per-image CSVs in ``per_image/``, ``tolerance_vs_alignment.png``, ``perturbations.png`` and panels in
``panels/``; the summary and the main paired differences are printed (docs/demonstration.md has the
numbers). On the real subset (``clickme_test_1000.tfrecords``, 1000 classes)::

    advalign-jax evaluate --config configs/adversarial_alignment.py:clickme \\
        --config.data.files=/data/clickme_test_1000.tfrecords \\
        --config.models="('resnet50=checkpoints/resnet50', 'vit_b16=checkpoints/vit_b16_harmonized')"

Variants (``:ARG``):
  default     the embedded synthetic ClickMe data (read at 64 px) and the demonstration checkpoints.
  clickme     the real adversarial-alignment subset: 1000 classes, batch 50, models given on the
              command line.
  reference   as ``clickme`` with the input and attack of the study's PyTorch notebook as its published
              figures were made: records read in batches of 2 in record order and each pair min-maxed
              to [0, 1] as a whole (global min and max of both images), no model normalisation, the
              ``accumulate`` projection and clipping to [0, 255].
  runlocal    a tiny run for tests: 8 embedded images, 64 px, one model.

Human maps: every variant uses the map **as stored** (``data.heatmap_pipeline='as_stored'``), as the
study's parser does (decode the raw float32 224x224 map and reshape; no resize, no blur); a map whose
size differs from the image's is only resized to it. ``'harmonization'`` selects the harmonization
loader's resize-blur-resize instead.

Statistics: ``bootstrap.resamples`` (10,000), ``bootstrap.confidence`` (0.95) and ``bootstrap.seed``
set the percentile bootstrap of every interval (:mod:`advalign_jax.evaluation.stats`); they change
only the summaries, so a finished run reprints with other values. ``cue_swap``: the cue-swap test
where the data's ``data synth`` metadata describes a patch cue (:mod:`advalign_jax.evaluation.cue_swap`).

Epsilon is in units of [0, 1] RGB pixels; every model normalises its input itself, so eps means the
same for every model (``attack_domain='unit'``). ``'minmax'`` (with ``minmax_group`` records min-maxed
together, no model normalisation) and ``'standardized'`` reproduce the reference's PyTorch and
TensorFlow domains.
"""

import ml_collections

from advalign_jax.data import embedded_files
from advalign_jax.data.config_block import data_block

DEMO_MODELS = ("small_cnn=checkpoints/small_cnn_vanilla", "small_cnn=checkpoints/small_cnn_randomcue",
               "small_cnn=checkpoints/small_cnn_harmonized")
DEMO_IMAGE_SIZE = 64  # the demonstration models' input size


def get_config(arg: str = "default"):
    c = ml_collections.ConfigDict()
    # The study correlates against the map as stored (no resize, no blur): data.heatmap_pipeline.
    c.data = data_block(files=tuple(embedded_files("val")), batch_size=32, mode="eval", num_classes=10,
                        heatmap_pipeline="as_stored")
    c.models = DEMO_MODELS  # each 'ARCH=CHECKPOINT_DIR'
    c.workdir = "results/adversarial_alignment"

    c.attack = ml_collections.ConfigDict()
    c.attack.norm = "l2"
    c.attack.steps = 3
    c.attack.step_size = 0.5
    c.attack.relative_step = False
    c.attack.projection = "sphere"  # 'ball' (correct PGD), 'sphere' (the study), 'accumulate' (its notebook)
    c.attack.random_start = "none"
    c.attack.loss = "ce"
    c.attack.clip = (0.0, 1.0)

    c.search = ml_collections.ConfigDict()
    c.search.kind = "reference"  # 'reference' protocol or 'doubling' (double, then bisect)
    c.search.gate_eps = 10.0
    c.search.split_eps = 1.0
    c.search.low = 0.001
    c.search.low_width = 0.01
    c.search.high_width = 0.1
    c.search.eps0 = 0.25  # doubling search
    c.search.max_doublings = 8
    c.search.bisection_steps = 10
    c.search.unfooled = "drop"  # 'drop' (PyTorch reference) or 'record' (TF reference: eps = gate)

    c.attack_domain = "unit"  # 'unit', 'minmax' (PyTorch reference), 'standardized' (TF reference)
    c.minmax_group = 2  # 'minmax': consecutive records min-maxed together (its notebook read batches of 2)
    c.resize_to_model = True  # resize images (and maps) to a model's input size when they differ
    c.resize_method = "bicubic"
    c.num_panels = 6
    c.cue_swap = True  # the cue-swap test where the data's metadata describes a synthetic patch cue
    c.bootstrap = ml_collections.ConfigDict({"resamples": 10000, "confidence": 0.95, "seed": 0})
    c.dtype = "float32"
    c.max_images = -1  # evaluate only the first N records (-1: all)
    c.seed = 0
    c.distributed = False  # jax.distributed.initialize() for multi-host runs
    c.num_devices = 0  # use the first N devices (0: all)

    if arg == "default":
        c.data.image_size = DEMO_IMAGE_SIZE
    elif arg in ("clickme", "reference"):
        c.data.files = ("clickme_test_1000.tfrecords",)
        c.data.num_classes = 1000
        c.data.batch_size = 50
        c.models = ("resnet50=checkpoints/resnet50",)
        if arg == "reference":
            c.attack.projection = "accumulate"
            c.attack.clip = (0.0, 255.0)
            c.attack_domain = "minmax"
    elif arg == "runlocal":
        c.data.batch_size = 4
        c.data.image_size = DEMO_IMAGE_SIZE
        c.resize_to_model = False  # the small CNN takes any size (the tests give other sizes)
        c.max_images = 8
        c.models = (DEMO_MODELS[0],)
        c.num_panels = 2
    else:
        raise ValueError(f"unknown variant {arg!r}: use default, clickme, reference or runlocal")
    return c
