"""The config blocks every training config carries (typed defaults, so overrides parse)."""

from __future__ import annotations

import ml_collections

# The harmonization package's weight-decay name mask (substrings of excluded parameter names).
REFERENCE_DECAY_EXCLUDE = ("bn/", "normalization", "embed", "Norm", "norm", "class_token")
# Our flax models name their norm layers bn*/norm*/ln*; with '/' separators this keeps the
# reference's intent (no decay on normalisation layers, embeddings or class tokens).
DECAY_EXCLUDE = REFERENCE_DECAY_EXCLUDE + ("bn", "ln", "cls_token", "pos_embed", "pos_emb")


def model_block(name: str, **options) -> ml_collections.ConfigDict:
    block = ml_collections.ConfigDict()
    block.name = name
    block.options = ml_collections.ConfigDict(options)
    block.init_from = ""  # a model directory to fine-tune from ('' = random init)
    return block


def objective_block(name: str = "ce", **overrides) -> ml_collections.ConfigDict:
    block = ml_collections.ConfigDict()
    block.name = name
    block.label_smoothing = 0.0
    block.weight_decay = 0.0  # L2 term in the loss (the harmonization recipe uses 1e-5)
    block.decay_exclude = DECAY_EXCLUDE
    # the harmonizer (objective 'harmonizer')
    block.lambda_harmonization = 1.0
    block.pyramid_levels = 5
    block.saliency = "mean"
    for k, v in overrides.items():
        block[k] = v
    return block


def optimizer_block(name: str = "sgd", **overrides) -> ml_collections.ConfigDict:
    block = ml_collections.ConfigDict()
    block.name = name
    block.momentum = 0.9
    block.nesterov = True
    block.b1 = 0.9
    block.b2 = 0.999
    block.weight_decay = 0.0  # decoupled weight decay (adamw; added to sgd's update)
    block.decay_exclude = DECAY_EXCLUDE
    block.grad_clip = 0.0
    for k, v in overrides.items():
        block[k] = v
    return block


def schedule_block(name: str = "warmup_step", **overrides) -> ml_collections.ConfigDict:
    block = ml_collections.ConfigDict()
    block.name = name
    block.base_lr = 0.1
    block.warmup_epochs = 0.0
    block.boundaries = (30.0, 60.0, 80.0)  # epochs
    block.factors = (0.1, 0.01, 0.001)  # cumulative multipliers of base_lr
    block.end_factor = 0.0  # cosine
    for k, v in overrides.items():
        block[k] = v
    return block


def trainer_fields(c: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Loop, checkpoint and logging fields shared by every training config."""
    c.workdir = workdir
    c.total_steps = 1000
    c.steps_per_epoch = 100  # for epoch-based schedules
    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.eval_every = 0  # 0: evaluate at the end only
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'bfloat16' keeps float32 parameters
    c.remat = False
    c.export_to = ""  # also write the final model directory here (default: workdir/model)
    c.distributed = False
    c.num_devices = 0  # use the first N devices (0: all)
    return c
