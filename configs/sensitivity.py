"""Unit-level adversarial sensitivity (``advalign-jax evaluate-sensitivity``): how far an L2 perturbation of
radius eps can move one unit's response, normalised by the unit's spread over clean images, for a
standard and an adversarially trained network (Guo, Lee, Leclerc, Dapello, Rao, Madry, DiCarlo,
"Adversarially trained neural representations may already be as robust as corresponding biological
neural representations", ICML 2022, arXiv 2206.11228).

Command (the study's setup: torchvision ResNet-50 and the robustness library's ImageNet ResNet-50 at L2
eps 3, imported with ``advalign-jax convert --from resnet50-0676ba61.pth --arch resnet50 --out
checkpoints/resnet50_standard`` and ``advalign-jax convert --from imagenet_l2_3_0.pt --arch resnet50 --out
checkpoints/resnet50_l2_eps3``; ImageNet prepared for TFDS)::

    advalign-jax evaluate-sensitivity --config configs/sensitivity.py --config.data.data_dir=/data/tfds

What it measures, per model, for each of the first 42 validation images, each of 21 penultimate units
(a seeded sample of the 2,048) and each eps of the grid: ``max_{||d|| <= eps} |r(x + d) - r(x)|``, estimated
with both signs, 100 restarts, 2 eps then eps, an annealed step (a lower bound of the true maximum); then
the mean over units and images of ``s / sigma`` (``sigma``: the unit's std over the images) with a two-way
bootstrap interval, the random-image-pair baseline, and the paired comparison of the two models. The
study's headline: units of the adversarially trained ResNet-50 are about 10x less sensitive than IT
units; the eps regime is L2 "[1, 10]" (the image scale is not stated; here eps is in [0, 1] pixel units
at 224 px, the unit the L2 eps 3 training radius is in). Cost: 2 x 100 runs x 2 x 20 forward-backward
passes per item, 42 x 21 x 7 items per model: about 5 x 10^7 ResNet-50 passes, an accelerator job (shard
it with ``--config.num_devices``). Not run here (no ImageNet, no weights offline).

Expected result: ``results/sensitivity/summary.csv`` (one row per model, layer and eps: mean ``s / sigma``
with its interval) and ``comparison.csv`` (the paired ratio of the models). The study reports the
adversarially trained ResNet-50's units several times less sensitive than the standard one's across the
eps grid, and about 10x less sensitive than IT units. The offline ``digits`` variant measured the same
direction over three seeds: at eps 1, ``s / sigma`` 3.30 for vanilla against 0.77 for PGD-AT L2 (a
ratio of about 4; docs/sensitivity.md).

Variants (``:ARG``):
  default   the study's setup above.
  sites     neural sites through a model: a PLS readout (25 components, 90/10 cross-validation, as
            Brain-Score) from ResNet-50's ``layer3_out`` channel means to the recordings given by
            ``--config.recordings=FILE.npz`` (``images`` (N, H, W, 3), ``responses`` (N, sites),
            optional ``sites``) or TFRecords; every site measured on the first 42 recorded images.
  targeted  "super-stimuli": each unit driven to the 99th percentile of its clean responses, at eps 2.5
            and 10 (the step halves after an overshoot: decay 0.5).
  runlocal  a tiny offline run: the embedded demonstration models (vanilla, randomcue, harmonized; 64
            px) on 6 embedded images, 4 penultimate units, eps 0.5 and 1, 2 restarts of 6 + 6 steps:
            rows, summary with intervals, comparison and figure in well under a minute on a CPU.
  digits    the offline comparison of docs/sensitivity.md: give the models, e.g.
            ``--config.models="('vanilla=results/adversarial_comparison/vanilla_s0/model', ...)"``
            (``scripts/sensitivity_comparison.py`` runs it for every method and seed).

Models are ``NAME=MODEL_DIR`` (a directory written by ``advalign-jax train`` or ``convert``; results are
filed under NAME, tied to the checkpoint's fingerprint). Layers: every architecture's ``features`` (the
penultimate features) and ``logits``, plus its stage outputs (``advalign-jax evaluate-sensitivity
--config.layer=?`` lists them in its error line).
"""

import ml_collections


def get_config(arg: str = "default"):
    c = ml_collections.ConfigDict()
    c.models = ("standard=checkpoints/resnet50_standard", "robust_l2_eps3=checkpoints/resnet50_l2_eps3")

    c.data = ml_collections.ConfigDict()  # the images measured (without recordings)
    c.data.source = "tfds:imagenet2012"  # 'tfds:NAME', 'digits', 'embedded', ...
    c.data.split = "validation"
    c.data.data_dir = ""
    c.max_examples = 42  # the first N images (0: all); the study's 42 images

    c.recordings = ""  # .npz or TFRecords of images and an images x sites response matrix: measure sites
    c.readout = ml_collections.ConfigDict()
    c.readout.method = "pls"  # 'pls' (Brain-Score: 25 components, scale=False) or 'ridge'
    c.readout.n_components = 25
    c.readout.alpha = 1.0  # ridge
    c.readout.splits = 10  # 90/10 cross-validation splits of the predictivity
    c.readout.train_fraction = 0.9

    c.layer = "features"  # the penultimate features; any layer the architecture sows
    c.units = ml_collections.ConfigDict()
    c.units.reduce = "mean"  # 'mean': a channel's spatial mean; 'position': a channel at a position
    c.units.count = 21  # a seeded sample of this many units (0: all); the study's 21 IT sites
    c.units.seed = 0
    c.units.indices = ()  # explicit unit indices instead of a sample

    c.eps = (0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0)  # L2 radii in [0, 1] pixel units
    c.search = ml_collections.ConfigDict()
    c.search.restarts = 100  # per sign
    c.search.steps = 20  # candidates per phase (2 eps, then eps)
    c.search.wide = 2.0
    c.search.decay = 0.9
    c.search.start = "random"
    c.clip = (0.0, 1.0)  # the valid image range; () for none

    c.mode = "untargeted"  # or 'targeted'
    c.target = ml_collections.ConfigDict()
    c.target.kind = "quantile"  # the level: a 'quantile' of the unit's clean responses, mean + level 'sigma', a 'value'
    c.target.level = 0.99
    c.target.tolerance = 0.1  # reached: within this many sigmas of the level

    c.bootstrap = ml_collections.ConfigDict()
    c.bootstrap.resamples = 2000
    c.bootstrap.confidence = 0.95
    c.bootstrap.seed = 0

    c.batch_size = 1  # items per batch and device; each runs 2 x restarts perturbations (200 ResNet-50 images)
    c.seed = 0
    c.dtype = "float32"
    c.workdir = "results/sensitivity"
    c.distributed = False
    c.num_devices = 0

    if arg == "default":
        pass
    elif arg == "sites":
        c.models = ("resnet50=checkpoints/resnet50_standard",)
        c.layer = "layer3_out"
        c.units.count = 0
        c.workdir = "results/sensitivity_sites"
    elif arg == "targeted":
        c.mode = "targeted"
        c.eps = (2.5, 10.0)
        c.search.decay = 0.5  # a level overshot is a step without progress: shrink faster than the untargeted 0.9
        c.workdir = "results/sensitivity_targeted"
    elif arg == "runlocal":
        c.models = ("vanilla=checkpoints/small_cnn_vanilla", "randomcue=checkpoints/small_cnn_randomcue",
                    "harmonized=checkpoints/small_cnn_harmonized")
        c.data.source = "embedded"
        c.max_examples = 6
        c.units.count = 4
        c.eps = (0.5, 1.0)
        c.search.restarts = 2
        c.search.steps = 6
        c.batch_size = 8
        c.bootstrap.resamples = 500
        c.workdir = "results/sensitivity_runlocal"
    elif arg == "digits":
        c.models = ()
        c.data.source = "digits"
        c.data.split = "test"
        c.max_examples = 24
        c.units.count = 10
        c.eps = (0.25, 0.5, 1.0, 2.0)
        c.search.restarts = 4
        c.search.steps = 15
        c.batch_size = 32
        c.workdir = "results/sensitivity_digits"
    else:
        raise ValueError(f"unknown variant {arg!r}: use default, sites, targeted, runlocal or digits")
    return c
