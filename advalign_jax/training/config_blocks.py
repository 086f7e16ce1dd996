"""The config blocks every training config carries (typed defaults, so overrides parse)."""

from __future__ import annotations

import ml_collections

from advalign_jax.training.optim import official_pag_boundaries

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
    # right for the right reasons (objective 'rrr'): lambda x the squared input-gradient off the human map
    block.lambda_rrr = 1.0
    block.rrr_threshold = 0.0  # 0: the soft mask 1 - map; t > 0: the binary mask map < t
    # harmonizer and PAG: the order in which the parameter gradient goes through the input-gradients:
    # 'reverse_over_reverse' (back through the VJP) or 'reverse_over_forward' (the gradient of
    # forward-mode directional derivatives). The same loss and gradient; docs/benchmarks.md compares
    # their cost ("Orders of differentiation"). 'auto': the faster measured order of each objective,
    # reverse_over_forward for PAG (1.7x at K = 10), reverse_over_reverse for the harmonizer.
    block.differentiation = "auto"
    # PAG (objective 'pag'; advalign_jax/training/objectives/pag.py)
    block.pag_weight = 15.0
    block.reduction = "mean"
    block.num_targets = 0  # 0: all classes
    block.semantics = "shared"
    block.grad_scale = "mean"
    block.target_source = "nearest_neighbour"
    block.nn_sample_size = 0  # 0: every training image of the class
    block.nn_chunk_size = 256
    block.class_mean_scale = 0.0  # 0: automatic
    block.targets_file = ""
    # precomputed targets: 'verify' (train on the data split; its image i must be the file's image i) or
    # 'file' (train on the file's own images and labels, as the official code does)
    block.targets_images = "verify"
    block.targets_labels_file = ""  # labels for targets_images='file' when the file holds none (.npy/.npz/.pt)
    block.targets_image_range = "0_1"  # the range of the file's images: '0_1' or '-1_1' (the official files)
    block.warm_steps = 0  # steps at warm_weight before pag_weight applies (0: none)
    block.warm_weight = 0.0
    block.augment_padding = 0  # crop with padding (and flip) inside the loss; 0: no augmentation
    block.augment_fill = 0.5
    block.per_example_augment = True
    # adversarial training (objectives 'adversarial' and 'trades')
    block.adversarial = adversarial_block()
    for k, v in overrides.items():
        block[k] = v
    return block


def adversarial_block(**overrides) -> ml_collections.ConfigDict:
    """The attack inside an adversarial training step (objectives ``adversarial`` and ``trades``); the
    defaults are the ``robustness`` library's CIFAR-10 L2 recipe at eps 0.5 (7 steps of eps / 5, no
    random start, the best iterate) with TRADES's beta."""
    block = ml_collections.ConfigDict()
    block.constraint = "l2"  # 'l2' or 'linf'
    block.eps = 0.5
    block.step_size = 0.1  # absolute, in [0, 1] pixel units (the library's attack_lr)
    block.steps = 7
    block.random_start = False
    block.use_best = True
    block.attack_loss = "ce"  # 'ce' or 'margin' (the library's custom_adv_loss)
    block.eps_warmup_steps = 0  # the radius grows linearly from 0 over these steps (custom_eps_multiplier)
    block.beta = 6.0  # TRADES: weight of the KL term
    block.regularizer = ""  # 'harmonizer' or 'pag': that objective's term on the clean input, added
    block.regularizer_weight = 1.0
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


def arrays_block(source: str, **overrides) -> ml_collections.ConfigDict:
    """Which in-memory dataset ``data_kind='arrays'`` trains and evaluates on."""
    block = ml_collections.ConfigDict()
    block.source = source  # 'tfds:cifar10', 'digits', 'toy2d', 'synthetic'
    block.train_split = "train"
    block.test_split = "test"
    block.data_dir = ""  # TFDS data_dir ('' = TFDS's default)
    block.limit = 0  # first N training examples (0: all)
    block.eval_limit = 0  # first N test examples (0: all)
    for k, v in overrides.items():
        block[k] = v
    return block


def eval_attack_block(**overrides) -> ml_collections.ConfigDict:
    """The attack of the per-epoch robust evaluation (default: PAG's official one: untargeted L2 PGD,
    eps 0.5, 7 steps of 1.5 * eps / 7, random start uniform in +-8/255 per pixel, last iterate)."""
    block = ml_collections.ConfigDict()
    block.norm = "l2"
    block.eps = 0.5
    block.steps = 7
    block.step_size = 1.5 / 7
    block.relative_step = True
    block.random_start = "box"
    block.start_radius = 8 / 255
    block.target = "none"  # 'none' (untargeted) or 'next' (class (y + 1) mod C: the other class of two)
    block.clip = (0.0, 1.0)  # () for no clipping (the toy points)
    for k, v in overrides.items():
        block[k] = v
    return block


def pag_official_semantics(c: ml_collections.ConfigDict, epochs: int = 100) -> ml_collections.ConfigDict:
    """Turns a PAG CIFAR recipe into what the official code does (``royg27/PAG-ROB``
    ``TRAIN_CIFAR10.py``), in place:

    - a second, training-mode forward pass over the batch replicated K times for the alignment term
      (``objective.semantics='replicated'``; BatchNorm statistics updated twice per step);
    - one random crop and one flip for the whole batch (torchvision's transforms on a 4-D tensor), drawn
      afresh for the cross-entropy pass and for the alignment pass (``per_example_augment=False``);
    - the learning-rate steps at the 1-indexed epochs 50, 75 and 100 of its ``adjust_learning_rate``
      (:func:`advalign_jax.training.optim.official_pag_boundaries`: epochs 49, 74, 99 counted from 0,
      so the last epoch runs at 1e-5);
    - with precomputed targets, training on the target file's own images and labels
      (``targets_images='file'``; the official files hold [-1, 1] images, ``targets_image_range``).
    """
    c.objective.semantics = "replicated"
    c.objective.per_example_augment = False
    c.schedule.boundaries = official_pag_boundaries(epochs)
    c.schedule.factors = (0.1, 0.01, 0.001)
    if c.objective.target_source == "precomputed":
        c.objective.targets_images = "file"
        c.objective.targets_image_range = "-1_1"
        c.objective.targets_file = "data/c10_sbg_data.pt"  # the official paths
        c.objective.targets_labels_file = "data/c10_sbg_label.pt"
    return c


def official_variant(arg: str) -> tuple:
    """``'official'`` -> ``('sbg', True)`` (the official run: score-based targets); ``'nn_official'`` ->
    ``('nn', True)``; any other variant -> ``(arg, False)``."""
    if arg == "official":
        return "sbg", True
    if arg.endswith("_official"):
        return arg[:-len("_official")], True
    return arg, False
