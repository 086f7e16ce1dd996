"""Robust models as image generators (``advalign-jax synthesize``): class-conditional generation,
representation inversion, interpolation and feature visualisation by plain L2 gradient steps (Santurkar,
Tsipras, Tran, Ilyas, Engstrom, Madry, "Image Synthesis with a Single (Robust) Classifier", NeurIPS 2019;
Engstrom, Ilyas, Santurkar, Tsipras, Tran, Madry, "Adversarial Robustness as a Prior for Learned
Representations", 2019; recipes of MadryLab/robustness ``docs/example_usage/input_space_manipulation.rst``).

Command (the ImageNet-scale setup: the robustness library's L2 eps 3 ResNet-50 beside the standard one,
imported with ``advalign-jax convert --from imagenet_l2_3_0.pt --arch resnet50 --out
checkpoints/resnet50_l2_eps3``; ImageNet prepared for TFDS)::

    advalign-jax synthesize --config configs/synthesize.py --config.data.data_dir=/data/tfds

Expected result: ``results/synthesize/NAME/TASK.png`` grids and ``TASK.npz`` arrays per model, and
``summary.csv``. The papers show the robust model's generated images, inversions and visualisations as
recognisable objects of the class and the standard model's as noise-like patterns that still fool it
(own accuracy near 100% for both; an independent model, ``--config.judge=MODEL_DIR``, recognises only the
robust model's). The offline demonstration (``docs/robust_features.md``) measures the same on digits.

Recipes (``TASK.eps``, ``TASK.step_size``, ``TASK.steps``, ``TASK.use_best``):
  generate     targeted towards each class, from a sample of the class's Gaussian fitted on the training
               split downsampled by ``generate.grain`` (4 here, 1 at CIFAR scale): eps 40, step 1, 60
               iterations (CIFAR: 30, 0.5, 60); the library's best iterate. Gaussians are fitted for the
               classes of ``generate.classes`` only (ImageNet: a D x D covariance per class, D = 56 x 56 x 3)
               on the first ``generate.fit_limit`` training images (0: all). ``generate.seeds='pooled'``
               draws every seed from one Gaussian of all training images instead (no class in the seed),
               ``'noise'`` from ``clamp(randn / 20 + 0.5, 0, 1)``.
  invert       from ``clamp(randn / 20 + 0.5, 0, 1)``, minimising ||rep(x) - rep(x_t)|| / ||rep(x_t)||: eps
               1000, step 1, 10,000 iterations in the papers (here 2,000), the last iterate.
  interpolate  inverting the blends of two images' representations from the image blends.
  visualize    maximising one unit of the representation, from evaluation images and noise: eps 1000,
               step 1, 200 iterations.
The representation is ``layer`` (default ``features``, the penultimate layer) read with the last ReLU's
backward pass replaced by the identity (``fake_relu``, the library's); any layer the model sows may be
named (an unknown one lists them).

Variants (``:ARG``):
  default   the ImageNet setup above (10 classes of generation, 8 inversions, 4 interpolations, 8 units).
  cifar     the CIFAR-10 setup (robustness library's CIFAR ResNet-50, L2 eps 0.5; grain 1; eps 30, step 0.5).
  runlocal  offline, in well under a minute: the shipped digits models (``checkpoints/digits_vanilla``
            and ``checkpoints/digits_pgd_l2``, ``scripts/train_digits_models.sh``) on the bundled digits,
            every task at small budgets.
  digits    the offline demonstration of docs/robust_features.md: give ``--config.models`` (models trained
            on the digits by ``scripts/adversarial_comparison.py``) and a ``--config.judge``.
"""

import ml_collections

VARIANTS = ("default", "cifar", "runlocal", "digits")


def _task(eps, step_size, steps, use_best):
    return ml_collections.ConfigDict({"eps": eps, "step_size": step_size, "steps": steps, "use_best": use_best})


def get_config(arg: str = "default"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}: use {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.models = ("standard=checkpoints/resnet50_standard", "robust_l2_eps3=checkpoints/resnet50_l2_eps3")
    c.tasks = ("generate", "invert", "interpolate", "visualize")
    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds:imagenet2012"  # 'tfds:NAME', 'digits', 'embedded', 'constructed:DIR', ...
    c.data.train_split = "train"  # the class Gaussians
    c.data.split = "validation"  # inversion, interpolation and visualisation images; the judge's real images
    c.data.data_dir = ""
    c.layer = "features"
    c.fake_relu = True

    c.generate = _task(40.0, 1.0, 60, True)
    c.generate.classes = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900)  # () : every class
    c.generate.per_class = 8
    c.generate.grain = 4
    c.generate.seeds = "class"  # 'class' (the papers'), 'pooled' (one Gaussian of every image) or 'noise'
    c.generate.fit_limit = 0
    c.invert = _task(1000.0, 1.0, 2000, False)
    c.invert.count = 8
    c.interpolate = _task(1000.0, 1.0, 2000, False)
    c.interpolate.pairs = 4
    c.interpolate.alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
    c.visualize = _task(1000.0, 1.0, 200, False)
    c.visualize.count = 8  # units: a seeded sample of the representation's (0: all)
    c.visualize.units = ()  # or these indices
    c.visualize.seeds = 4  # per unit: the first half evaluation images, the rest noise

    c.judge = ""  # an independent model directory: its accuracy on the generated images, a Frechet distance
    c.batch_size = 16
    c.seed = 0
    c.dtype = "float32"
    c.workdir = "results/synthesize"
    c.distributed = False
    c.num_devices = 0

    if arg == "cifar":
        c.models = ("standard=checkpoints/cifar10_resnet50_standard", "robust_l2_eps0.5=checkpoints/cifar10_resnet50_l2_0.5")
        c.data.source = "tfds:cifar10"
        c.data.split = "test"
        c.generate.update(dict(eps=30.0, step_size=0.5, steps=60, grain=1, classes=()))
        c.interpolate.step_size = 0.1
        c.workdir = "results/synthesize_cifar"
    elif arg == "runlocal":
        c.models = ("vanilla=checkpoints/digits_vanilla", "pgd_l2=checkpoints/digits_pgd_l2")
        c.data.source = "digits"
        c.data.split = "test"
        c.generate.update(dict(eps=8.0, step_size=0.2, steps=20, grain=1, classes=(0, 1, 2, 3), per_class=3))
        c.invert.update(dict(step_size=0.1, steps=50, count=4))
        c.interpolate.update(dict(step_size=0.1, steps=50, pairs=2, alphas=(0.0, 0.5, 1.0)))
        c.visualize.update(dict(step_size=0.1, steps=20, count=2, seeds=2))
        c.judge = "checkpoints/digits_vanilla"
        c.batch_size = 32
        c.workdir = "results/synthesize_runlocal"
    elif arg == "digits":
        c.models = ()
        c.data.source = "digits"
        c.data.split = "test"
        c.generate.update(dict(eps=8.0, step_size=0.2, steps=60, grain=1, classes=(), per_class=10))
        c.invert.update(dict(step_size=0.1, steps=1000, count=10))
        c.interpolate.update(dict(step_size=0.1, steps=1000, pairs=4, alphas=(0.0, 0.25, 0.5, 0.75, 1.0)))
        c.visualize.update(dict(step_size=0.1, steps=200, count=6, seeds=4))
        c.batch_size = 100
        c.workdir = "results/synthesize_digits"
    return c
