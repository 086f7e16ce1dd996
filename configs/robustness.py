"""Robust accuracy (``advalign-jax evaluate-robust``): clean, PGD-20, and AutoAttack "standard" (APGD-CE,
APGD-T, FAB-T, Square) under L2 and Linf, at RobustBench's radii.

Command (a model directory written by ``advalign-jax train`` or ``advalign-jax convert``, e.g. the
export of ``configs/pag_cifar10_resnet18.py``; CIFAR-10 prepared once with ``tfds build cifar10
--data_dir /data/tfds``)::

    advalign-jax evaluate-robust --config configs/robustness.py --config.data.data_dir=/data/tfds \\
        --config.model_dir=results/pag_cifar10_cifar_resnet18_nn/model --config.workdir=results/robust_pag

Expected result: ``summary.csv`` with the clean accuracy and, per attack (``pgd-l2``, ``pgd-linf``,
``autoattack-l2``, ``autoattack-linf``), the robust accuracy, for AutoAttack also after each of its four
stages and the time each took, plus ``all``: robust under every attack, and a ``checks`` column naming
AutoAttack's sanity checks that fired (also logged as warnings: a randomised model, outputs that look
like probabilities, inputs outside [0, 1], fewer classes than targets, points with a zero gradient,
Square breaking points the gradient-based attacks missed, later attacks breaking points far inside the
radius); ``per_example.csv`` with one row per test image. AutoAttack "standard" is the figure
RobustBench reports and papers compare; reference points on CIFAR-10 (the PAG paper, Ganz et al. 2023, and RobustBench): an
undefended model 94.78% clean, 0.0% robust under both norms; the PAG paper's score-based-target models
50.87% / 15.97% (L2 0.5 / Linf 8/255) at lambda 1 and 55.39% / 23.97% at lambda 2. Cost per image and
norm: 20 PGD steps, then 100 APGD-CE and 9 x 100 APGD-T gradient evaluations, 9 x 100 FAB-T gradient
and forward evaluations and up to 5,000 Square forward passes, each stage on the points still robust
only (a Square run stops once every point of its chunk is broken); a full 10,000-image run with a
ResNet-18 is a GPU job. Set ``max_examples`` for a quick look and raise it later in the same workdir to
extend the run; an interrupted run resumes when rerun. Not measured here (no CIFAR-10 on the
development machine); the runlocal variant is what the tests run.

Variants (``:ARG``):
  cifar10     the default: the 10,000 CIFAR-10 test images (``tfds:cifar10``).
  cifar100    the CIFAR-100 test images (APGD-T and FAB-T keep 9 targets, as AutoAttack).
  runlocal    a tiny offline run: the embedded demonstration checkpoint
              (``checkpoints/small_cnn_vanilla``, 64 px) on the first 32 embedded synthetic ClickMe
              images (read at the model's 64 px), at eps 0.5/255 (Linf) and 0.2 (L2): small radii,
              where this undefended model keeps some points (at 1/255 APGD-CE alone breaks nearly all);
              PGD 3 steps, APGD and FAB 5 iterations, 3 targets, Square 100 queries.
              ``--config.attacks="('autoattack-linf',)"`` runs the four AutoAttack stages and writes
              the per-stage table (78.12% clean, 34.38% after APGD-CE, 31.25% after APGD-T, FAB-T
              and Square; under a minute on a 2-core CPU, mostly compilation). The tests run it with
              their own 16x16 model on ``digits``.

Attacks are ``KIND-NORM`` strings, NORM ``l2`` or ``linf``; KIND: ``pgd``; ``apgd`` (APGD-CE then
APGD-T); ``autoattack`` (standard), ``autoattack-plus`` (APGD-CE and APGD-DLR with 5 restarts, FAB with
5 restarts, Square, APGD-T, FAB-T) or ``autoattack-rand`` (APGD-CE and APGD-DLR averaging 20 draws of a
randomised model's gradient); or one attack of AutoAttack on its own: ``apgd-ce``, ``apgd-t``,
``apgd-dlr``, ``fab`` (untargeted), ``fab-t``, ``square``. Radii are in units of [0, 1] pixels (every
model normalises its input itself); use ``--config.clip="()"`` for inputs that are not images
(``toy2d``), with PGD or APGD-CE only there (APGD-T needs at least 4 classes, FAB a pixel box, Square
images).
"""

import ml_collections


def get_config(arg: str = "cifar10"):
    c = ml_collections.ConfigDict()
    c.model_dir = ""  # a model directory (model.json + variables/)
    c.arch = ""  # optional: the architecture the checkpoint must hold

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds:cifar10"  # 'tfds:NAME', 'digits', 'toy2d', 'synthetic', 'embedded'
    c.data.split = "test"
    c.data.data_dir = ""  # TFDS data_dir ('' = TFDS's default)

    c.attacks = ("pgd-l2", "pgd-linf", "autoattack-l2", "autoattack-linf")
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
    c.apgd.n_target_classes = 9  # APGD-T's and FAB-T's targets

    c.fab = ml_collections.ConfigDict()
    c.fab.n_iter = 100
    c.fab.n_restarts = 1  # fab-NORM alone (autoattack-plus uses autoattack.plus_restarts)

    c.square = ml_collections.ConfigDict()
    c.square.n_queries = 5000
    c.square.p_init = 0.8  # square-NORM alone (AutoAttack's value in the ensembles)
    c.square.n_restarts = 1

    c.autoattack = ml_collections.ConfigDict()
    c.autoattack.plus_restarts = 5  # autoattack-plus: restarts of APGD-CE, APGD-DLR and FAB
    c.autoattack.eot_iter = 20  # autoattack-rand: draws of the model averaged per APGD step

    c.max_examples = 0  # the first N examples (0: all); raising it later reuses the rows already computed
    c.clip = (0.0, 1.0)  # the valid input range; () for no clipping
    c.batch_size = 500
    c.stage_chunks = 4  # cascade stages attack their survivors in pieces of 1/stage_chunks of a batch
    c.seed = 0  # the random draws (each example draws from its index)
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
        c.model_dir = "checkpoints/small_cnn_vanilla"
        c.data.source = "embedded"
        c.max_examples = 32
        c.eps.l2 = 0.2
        c.eps.linf = 0.5 / 255
        c.pgd.steps = 3
        c.apgd.n_iter = 5
        c.apgd.n_target_classes = 3
        c.fab.n_iter = 5
        c.square.n_queries = 100
        c.batch_size = 32
        c.workdir = "results/robustness_runlocal"
    else:
        raise ValueError(f"unknown variant {arg!r}: use cifar10, cifar100 or runlocal")
    return c
