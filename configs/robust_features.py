"""The robust-features datasets (``advalign-jax construct``) of Ilyas, Santurkar, Tsipras, Engstrom, Tran,
Madry, "Adversarial Examples Are Not Bugs, They Are Features" (NeurIPS 2019; MadryLab/constructed-datasets).

Commands (CIFAR-10: the robustness library's CIFAR ResNet-50 checkpoints, imported with ``advalign-jax
convert --from cifar_nat.pt --arch cifar_resnet50 --out checkpoints/cifar10_resnet50_standard`` and
``... --from cifar_l2_0_5.pt ... --out checkpoints/cifar10_resnet50_l2_0.5``; CIFAR-10 prepared for TFDS)::

    advalign-jax construct --config configs/robust_features.py:det --config.data.data_dir=/data/tfds
    advalign-jax train --config configs/adversarial_cifar10_resnet50.py:vanilla \\
        --config.arrays.source=constructed:results/robust_features_det --config.workdir=results/train_on_det

(the same with ``:rand``, ``:robust``, ``:non_robust``); the trained model is evaluated on the original
CIFAR-10 test set (``constructed:DIR``'s test split is the original one), clean and with
``advalign-jax evaluate-robust`` at L2 eps 0.25.

Expected result (the constructed-datasets README, CIFAR-10 test accuracy of a model trained on each set):
D_R 84% (48% robust at L2 0.25), D_NR 88% (0% robust), D_rand 63%, D_det 44%. Independent reproductions
report lower numbers for D_det / D_rand (38% / 42%, constructed-datasets issue 11) and for D_NR (64% then
81.5%, issue 2). The offline demonstration on the digits is in docs/robust_features.md.

Recipes:
  det, rand            the targeted L2 attack on a standard model towards (y + 1) mod C, or a uniform random
                       class: eps 0.5, step 0.1, 100 steps (the library's best iterate); label: the target.
  robust, non_robust   representation matching of the penultimate features (fake ReLU) of a robust, or a
                       standard, model from a random other training image: step 0.1, 1000 steps, eps 1000
                       (only the [0, 1] box binds), the last iterate; label: the image's own.

Variants (``:ARG``):
  det         CIFAR-10 as above: the attack on the standard model towards (y + 1) mod C (the default).
  rand        CIFAR-10: towards a uniform random class.
  robust      CIFAR-10: matching the robust model's representation.
  non_robust  CIFAR-10: matching the standard model's representation.
  runlocal    offline in seconds: ``det`` on the first 256 bundled digits from the shipped standard digits
              model (``checkpoints/digits_vanilla``), 20 attack steps; then ``advalign-jax train --config
              configs/adversarial_digits.py:vanilla --config.arrays.source=constructed:results/robust_features_runlocal``.
  digits_det, digits_rand, digits_robust, digits_non_robust
              the whole digits training set (the shipped digits models; L2 eps 1.0 for det / rand), the
              demonstration of docs/robust_features.md (``scripts/robust_features_comparison.py``).
"""

import ml_collections

KINDS = ("det", "rand", "robust", "non_robust")
VARIANTS = KINDS + ("runlocal",) + tuple(f"digits_{k}" for k in KINDS)


def get_config(arg: str = "det"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}: use {', '.join(VARIANTS)}")
    kind = arg[len("digits_"):] if arg.startswith("digits_") else ("det" if arg == "runlocal" else arg)
    c = ml_collections.ConfigDict()
    c.kind = kind
    robust = kind == "robust"
    c.model = "checkpoints/cifar10_resnet50_l2_0.5" if robust else "checkpoints/cifar10_resnet50_standard"
    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds:cifar10"  # 'tfds:NAME', 'digits', 'synthetic', ...
    c.data.split = "train"
    c.data.data_dir = ""
    c.data.limit = 0  # the first N training images (0: all)
    c.attack = ml_collections.ConfigDict({"eps": 0.5, "step_size": 0.1, "steps": 100, "use_best": True})
    c.matching = ml_collections.ConfigDict({"eps": 1000.0, "step_size": 0.1, "steps": 1000, "use_best": False,
                                            "layer": "features", "fake_relu": True})
    c.batch_size = 256
    c.seed = 0  # the random targets (rand), the seed images (robust, non_robust)
    c.dtype = "float32"
    c.workdir = f"results/robust_features_{kind}"
    c.distributed = False
    c.num_devices = 0
    if arg == "runlocal" or arg.startswith("digits_"):
        c.model = "checkpoints/digits_pgd_l2" if robust else "checkpoints/digits_vanilla"
        c.data.source = "digits"
        c.attack.update(dict(eps=1.0, step_size=0.1, steps=100))  # digits: the L2 radius of their adversarial training
        c.matching.update(dict(step_size=0.1, steps=1000))
        c.workdir = f"results/robust_features_digits_{kind}"
    if arg == "runlocal":
        c.data.limit = 256
        c.attack.steps = 20
        c.batch_size = 128
        c.workdir = "results/robust_features_runlocal"
    return c
