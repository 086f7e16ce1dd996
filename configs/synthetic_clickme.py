"""Synthetic ClickMe shards (``advalign-jax data synth``): learnable images with a known human map.

Command (about 20 s on a 2-core CPU)::

    advalign-jax data synth --config configs/synthetic_clickme.py:train --out data/synth
    advalign-jax data inspect data/synth/train-*.tfrecords --out data/synth/train.png

Expected result: 4 shards ``train-{0..3}.tfrecords`` holding 2000 records (200 per class), JPEG
256x256 images and maps, labels 0..9; the PNG shows each image with its map over the object.

Variants (``:ARG``):
  train     2000 JPEG-256 records, 4 shards; a corner patch shows the label's colour 91% of the time.
  train_randomcue
            the same 2000 images but for the patch, whose colour is drawn independently of the label
            (an uninformative cue; the demonstration's control model trains on it).
  train_strongcue
            the same 2000 images with the patch always in the label's colour (a perfect shortcut: the
            harmonizer study of docs/demonstration.md trains on it, into data/synth_strongcue).
  val       the embedded default evaluation data: 128 JPEG-256 records, 1 shard, seed 1, and a patch
            colour drawn independently of the label (a model that took the shortcut is fooled by it).
  test_raw  the adversarial-alignment encoding: 100 raw-float32 224x224 records in one file.
  runlocal  a tiny JPEG set (24 records, 2 shards, 64 px) for tests.
"""

import ml_collections


def get_config(arg: str = "train"):
    c = ml_collections.ConfigDict()
    c.num_images = 2000
    c.num_shards = 4
    c.num_classes = 10
    c.size = 256
    c.encoding = "jpeg"  # 'jpeg' (harmonization shards) or 'raw_float32' (adversarial-alignment subset)
    c.jpeg_quality = 95
    c.cue = "patch"  # the spurious cue: 'patch' (corner square), 'tint' (background colour) or 'none'
    c.spurious = 0.9  # P(cue = the label's colour), else a random class's; 0 = uninformative cue
    c.seed = 0
    c.prefix = "train"
    if arg == "train":
        pass
    elif arg == "train_randomcue":
        c.spurious = 0.0
    elif arg == "train_strongcue":
        c.spurious = 1.0
    elif arg == "val":
        c.num_images, c.num_shards, c.spurious, c.seed, c.prefix = 128, 1, 0.0, 1, "val"
    elif arg == "test_raw":
        c.num_images, c.num_shards, c.size, c.encoding = 100, 1, 224, "raw_float32"
        c.spurious, c.seed, c.prefix = 0.0, 2, "clickme_test"
    elif arg == "runlocal":
        c.num_images, c.num_shards, c.size = 24, 2, 64
    else:
        raise ValueError(f"unknown variant {arg!r}: use train, train_randomcue, train_strongcue, val, test_raw or runlocal")
    return c
