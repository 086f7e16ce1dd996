"""The human-alignment score on ClickMe (``advalign-jax evaluate-clickme``).

Command::

    advalign-jax evaluate-clickme --config configs/human_alignment.py

Expected result: ``results/human_alignment/summary.csv`` with one row per model (the three embedded
demonstration models by default, at 64 px): accuracy, mean Spearman between the model's saliency and
the human maps, the human-alignment score (mean Spearman / 0.65753), Dice and IoU of the top 10%, each
mean with its 95% bootstrap interval, and the cue-swap test; ``comparison.csv`` (paired differences on
the same images), per-image CSVs, ``alignment.png``, ``saliency.png`` and panels. About a minute on a
2-core CPU. On the real ClickMe validation shards::

    advalign-jax evaluate-clickme --config configs/human_alignment.py:clickme \\
        --config.data.files="('/data/clickme/val-*.tfrecords',)" \\
        --config.models="('vit_b16=checkpoints/vit_b16_harmonized',)"

Variants (``:ARG``):
  default     the embedded synthetic validation shard (read at 64 px) and the demonstration checkpoints.
  clickme     the ClickMe validation shards (1000 classes), batch 64.
  runlocal    a tiny run for tests: 8 images at 64 px, one model.

``bootstrap`` and ``cue_swap`` as in ``configs/adversarial_alignment.py``.

Human maps go through the harmonization loader's pipeline (``data.heatmap_pipeline='harmonization'``:
resize to 64, 10x10 Gaussian blur, resize to 224), as the harmonization study scored its models.
"""

import ml_collections

from advalign_jax.data import embedded_files
from advalign_jax.data.config_block import data_block

DEMO_MODELS = ("small_cnn=checkpoints/small_cnn_vanilla", "small_cnn=checkpoints/small_cnn_randomcue",
               "small_cnn=checkpoints/small_cnn_harmonized")
DEMO_IMAGE_SIZE = 64  # the demonstration models' input size


def get_config(arg: str = "default"):
    c = ml_collections.ConfigDict()
    c.data = data_block(files=tuple(embedded_files("val")), batch_size=32, mode="eval", num_classes=10)
    c.models = DEMO_MODELS
    c.workdir = "results/human_alignment"
    c.saliency = "gradient"  # 'gradient' (|d logit_y / dx|, max over channels) or 'smoothgrad'
    c.smoothgrad = ml_collections.ConfigDict({"samples": 16, "sigma": 0.15})
    c.num_panels = 6
    c.cue_swap = True  # the cue-swap test where the data's metadata describes a synthetic patch cue
    c.bootstrap = ml_collections.ConfigDict({"resamples": 10000, "confidence": 0.95, "seed": 0})
    c.dtype = "float32"
    c.max_images = -1
    c.seed = 0
    c.distributed = False
    c.num_devices = 0
    if arg == "default":
        c.data.image_size = DEMO_IMAGE_SIZE
    elif arg == "clickme":
        c.data.files = ("clickme/val-*.tfrecords",)
        c.data.num_classes = 1000
        c.data.batch_size = 64
        c.models = ("resnet50v2=checkpoints/resnet50v2_harmonized",)
    elif arg == "runlocal":
        c.data.batch_size = 8
        c.data.image_size = DEMO_IMAGE_SIZE
        c.max_images = 8
        c.models = (DEMO_MODELS[0],)
        c.num_panels = 2
    else:
        raise ValueError(f"unknown variant {arg!r}: use default, clickme or runlocal")
    return c
