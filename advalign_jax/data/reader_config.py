"""The options of the ClickMe reader (:class:`ReaderConfig`), checked when they are made.

What each mode, map pipeline and sharding choice does is in :mod:`advalign_jax.data.reader`; the
``data`` block of the job configs is built from these fields (:mod:`advalign_jax.data.config_block`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from advalign_jax.data import preprocess, records
from advalign_jax.errors import ConfigError

EVAL, TRAIN = "eval", "train"
HEATMAP_PIPELINES = ("harmonization", "as_stored")


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
    """Options of :class:`~advalign_jax.data.reader.ClickMeReader`; the ``data`` block of every config
    mirrors these fields."""

    files: Sequence[str]
    batch_size: int  # per process
    mode: str = EVAL
    num_classes: int = 1000
    encoding: str = "auto"  # 'auto' | 'jpeg' | 'raw_float32'
    image_size: int = preprocess.IMAGE_SIZE
    heatmap_blur_size: int = preprocess.HEATMAP_BLUR_SIZE
    heatmap_small_method: str = "bilinear"  # 'bicubic' in the lab's older training code
    heatmap_pipeline: str = "harmonization"  # 'harmonization' (resize, blur, resize) or 'as_stored'
    image_range: str = "0_1"  # '0_1' or '0_255'
    minmax_maps: Optional[bool] = None  # None: True in train mode, False in eval mode
    random_crop: bool = True  # train mode only
    crop_area_range: tuple = (0.08, 1.0)
    crop_aspect_range: tuple = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True  # train mode only
    seed: int = 0
    shuffle_buffer: int = 2048
    cycle_length: int = 8
    skip_bad_records: bool = False
    allow_empty: bool = False  # accept files that hold no records (else: one line naming them)
    process_sharding: str = "global"  # train mode, several processes: 'global' or 'files' (module docstring)
    clickme_weight: float = 1.0
    mix_sources: Sequence[str] = ()  # e.g. ('tfds:imagenet2012:train',)
    mix_weights: Sequence[float] = ()
    tfds_data_dir: Optional[str] = None

    def __post_init__(self):
        if self.mode not in (EVAL, TRAIN):
            raise ConfigError(f"data.mode must be 'eval' or 'train', got {self.mode!r}")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.encoding not in ("auto",) + records.ENCODINGS:
            raise ConfigError(f"data.encoding must be one of auto, jpeg, raw_float32; got {self.encoding!r}")
        if self.process_sharding not in ("global", "files"):
            raise ConfigError(f"data.process_sharding must be 'global' or 'files', got {self.process_sharding!r}")
        if self.heatmap_pipeline not in HEATMAP_PIPELINES:
            raise ConfigError(f"data.heatmap_pipeline must be one of {', '.join(HEATMAP_PIPELINES)}; got "
                              f"{self.heatmap_pipeline!r}")
        if self.image_range not in ("0_1", "0_255"):
            raise ConfigError(f"data.image_range must be '0_1' or '0_255', got {self.image_range!r}")
        if len(self.mix_sources) != len(self.mix_weights):
            raise ConfigError(f"data.mix_sources has {len(self.mix_sources)} entries but data.mix_weights "
                              f"has {len(self.mix_weights)}")
        if self.mix_sources:
            if self.mode != TRAIN:
                raise ConfigError("data.mix_sources mixes map-less images into training; it needs "
                                  "data.mode='train'")
            weights = [self.clickme_weight, *self.mix_weights]
            if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
                terms = " + ".join(f"{w:g}" for w in weights)
                raise ConfigError(f"mixing weights data.clickme_weight + data.mix_weights must be "
                                  f"non-negative and sum to 1, got {terms} = {sum(weights):g}")

    @property
    def use_minmax(self) -> bool:
        return self.mode == TRAIN if self.minmax_maps is None else bool(self.minmax_maps)

