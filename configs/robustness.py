"""Robust accuracy (``advalign-jax evaluate-robust``): clean, PGD-20 and APGD-CE + APGD-T (the
white-box part of AutoAttack "standard") under L2 and Linf, at RobustBench's radii.

Command (a model directory written by ``advalign-jax train`` or ``advalign-jax convert``, e.g. the
export of ``configs/pag_cifar10_resnet18.py``; CIFAR-10 prepared once with ``tfds build cifar10
--data_dir /data/tfds``)::

    advalign-jax evaluate-robust --config configs/robustness.py --config.data.data_dir=/data/tfds \\
        --config.model_dir=results/pag_cifar10_cifar_resnet18_nn/model --config.workdir=results/robust_pag

Expected result: ``summary.csv`` with the clean accuracy and, per attack (``pgd-l2``, ``pgd-linf``,
``apgd-l2``, ``apgd-linf``), the robust accuracy (for the APGD attacks also after APGD-CE alone), plus
``all``: robust under every attack; ``per_example.csv`` with one row per test image. Reference points
on CIFAR-10 with AutoAttack (``../shared/spec/pag.md``): an undefended model 94.78% clean, 0.0% robust
under both norms; the PAG paper's score-based-target models 50.87% / 15.97% (L2 0.5 / Linf 8/255) at
lambda 1 and 55.39% / 23.97% at lambda 2. Our APGD stages leave out FAB-T and Square, so their robust
accuracy is an upper bound on AutoAttack's (close to it on models that do not mask gradients). Cost
per image and norm: 20 PGD steps, then at most 100 APGD-CE and 9 x 100 APGD-T gradient evaluations
(a run stops early once every image of its batch is flipped), so a full 10,000-image run with a
ResNet-18 is a GPU job. Set ``max_examples`` for a quick look and raise it later in the same workdir to
extend the run; an interrupted run resumes when rerun. Not measured here (no CIFAR-10 on the
development machine); the runlocal variant is what the tests run.

Variants (``:ARG``):
  cifar10     the default: the 10,000 CIFAR-10 test images (``tfds:cifar10``).
  cifar100    the CIFAR-100 test images (APGD-T keeps 9 targets, as AutoAttack).
  runlocal    a tiny run for tests: the first 24 ``digits`` test images (16x16x3), PGD 3 steps, APGD
              5 iterations and 3 targets; give a model that takes 16x16x3 inputs with
              ``--config.model_dir``. About 10 s on a 2-core CPU for a small CNN.

Attacks are ``KIND-NORM`` strings: KIND ``pgd``, ``apgd`` (APGD-CE then APGD-T), ``apgd-ce`` or
``apgd-t``; NORM ``l2`` or ``linf``. Radii are in units of [0, 1] pixels (every model normalises its
input itself); use ``--config.clip="()"`` for inputs that are not images (``toy2d``), with PGD or
APGD-CE only there (APGD-T needs at least 4 classes).
"""

import ml_collections


def get_config(arg: str = "cifar10"):
    c = ml_collections.ConfigDict()
    c.model_dir = ""  # a model directory (model.json + variables/)
    c.arch = ""  # optional: the architecture the checkpoint must hold

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds:cifar10"  # 'tfds:NAME', 'digits', 'toy2d', 'synthetic'
    c.data.split = "test"
    c.data.data_dir = ""  # TFDS data_dir ('' = TFDS's default)

    c.attacks = ("pgd-l2", "pgd-linf", "apgd-l2", "apgd-linf")
    c.eps = ml_collections.ConfigDict()
    c.eps.l2 = 0.5  # RobustBench, CIFAR-10
    c.eps.linf = 8 / 255

    c.pgd = ml_collections.ConfigDict()  # the robustness library's evaluation PGD
    c.pgd.steps = 20
    c.pgd.step_factor = 2.5  # step = step_factor * eps / steps
    c.pgd.random_start = False
    c.pgd.use_best = True

    c.apgd = ml_collections.ConfigDict()  # AutoAttack "standard"
    c.apgd.n_iter = 100
    c.apgd.n_restarts = 1
    c.apgd.n_target_classes = 9

    c.max_examples = 0  # the first N examples (0: all); raising it later reuses the rows already computed
    c.clip = (0.0, 1.0)  # the valid input range; () for no clipping
    c.batch_size = 500
    c.seed = 0  # the random starts (each example draws from its index)
    c.dtype = "float32"
    c.workdir = "results/robustness"
    c.distributed = False
    c.num_devices = 0  # use the first N devices (0: all)

    if arg == "cifar10":
        pass
    elif arg == "cifar100":
        c.data.source = "tfds:cifar100"
        c.workdir = "results/robustness_cifar100"
    elif arg == "runlocal":
        c.data.source = "digits"
        c.max_examples = 24
        c.pgd.steps = 3
        c.apgd.n_iter = 5
        c.apgd.n_target_classes = 3
        c.batch_size = 16
        c.workdir = "results/robustness_runlocal"
    else:
        raise ValueError(f"unknown variant {arg!r}: use cifar10, cifar100 or runlocal")
    return c
