"""The ``data`` block that every job's config carries, and its conversion to a ReaderConfig."""

from __future__ import annotations

import ml_collections

from advalign_jax.data.reader_config import ReaderConfig


def data_block(files=(), batch_size: int = 32, mode: str = "eval", heatmap_pipeline: str = "harmonization",
               **overrides) -> ml_collections.ConfigDict:
    """A ConfigDict with every ReaderConfig field (typed, so command-line overrides parse).

    ``heatmap_pipeline``: ``'harmonization'`` (the harmonization loader's resize-blur-resize: the
    human-alignment score, harmonizer training) or ``'as_stored'`` (the adversarial-alignment study).
    """
    block = ml_collections.ConfigDict()
    block.files = tuple(files)
    block.batch_size = batch_size  # global batch: split over processes by the job
    block.mode = mode
    block.num_classes = 1000
    block.encoding = "auto"
    block.image_size = 224
    block.heatmap_blur_size = 64
    block.heatmap_small_method = "bilinear"
    block.heatmap_pipeline = heatmap_pipeline
    block.image_range = "0_1"
    block.minmax_maps = mode == "train"
    block.random_crop = True
    block.crop_area_range = (0.08, 1.0)
    block.crop_aspect_range = (3.0 / 4.0, 4.0 / 3.0)
    block.flip = True
    block.seed = 0
    block.shuffle_buffer = 2048
    block.cycle_length = 8
    block.skip_bad_records = False
    block.allow_empty = False
    block.process_sharding = "global"  # train mode with several processes: 'global' or 'files'
    block.clickme_weight = 1.0
    block.mix_sources = ()
    block.mix_weights = ()
    block.tfds_data_dir = ""  # '' = TFDS's default
    for key, value in overrides.items():
        block[key] = value
    return block


def reader_config(block: ml_collections.ConfigDict, per_process_batch: int | None = None) -> ReaderConfig:
    """ReaderConfig from a ``data`` block; ``per_process_batch`` replaces the global batch size."""
    fields = block.to_dict()
    fields["files"] = tuple(fields["files"]) if not isinstance(fields["files"], str) else (fields["files"],)
    fields["mix_sources"] = tuple(fields["mix_sources"])
    fields["mix_weights"] = tuple(float(w) for w in fields["mix_weights"])
    fields["tfds_data_dir"] = fields["tfds_data_dir"] or None
    if per_process_batch is not None:
        fields["batch_size"] = per_process_batch
    return ReaderConfig(**fields)
