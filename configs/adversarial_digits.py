"""Adversarial training offline: scikit-learn's bundled 8x8 digits (upsampled to 16x16 RGB), vanilla vs
PGD adversarial training (the ``robustness`` library's, L2 and Linf) vs TRADES, on the small CNN of
``configs/pag_digits.py`` (so the PAG models of that config compare directly).

Commands (a few minutes each on a 2-core CPU)::

    advalign-jax train --config configs/adversarial_digits.py:pgd
    advalign-jax train --config configs/adversarial_digits.py:trades
    advalign-jax evaluate-robust --config configs/robustness.py:runlocal \\
        --config.model_dir=results/adversarial_digits_pgd/model --config.data.source=digits \\
        --config.eps.l2=1.0 --config.eps.linf=0.1 --config.max_examples=0 --config.workdir=results/robust_digits_pgd

Expected result: on the 360 held-out digits, ``eval_robust_accuracy`` (untargeted L2 PGD of radius 1.0,
20 steps of 2.5 x eps / 20, no random start, as in ``configs/pag_digits.py``) of a few percent for the
vanilla model and most of the clean accuracy for the L2 adversarially trained and TRADES models (docs/
adversarial_training.md has the table over seeds, with AutoAttack).

Model and budget: the small BatchNorm CNN (2x2 patch stem, widths 32-64-128), no input normalisation; Adam
lr 1e-3, 40 epochs of batch 64 (``configs/pag_digits.py``'s). The attacks inside the step, at the
evaluation's threat model:

- ``pgd``: L2, eps 1.0, 7 steps of 0.25 (the library's CIFAR steps: 7 of about eps / 4), no random start,
  the best iterate (the library's defaults);
- ``pgd_linf``: Linf, eps 0.1, 7 steps of 0.025, no random start, the best iterate;
- ``trades``: TRADES's L2 attack (start x + 0.001 N(0, I), 10 normalised-gradient steps of 2 eps / 10),
  eps 1.0, beta 6 (TRADES's CIFAR-10 value);
- ``trades_linf``: TRADES's Linf attack, eps 0.1, 10 steps of 0.02, beta 6.

Variants (``:ARG``):
  vanilla     cross-entropy only.
  pgd         PGD adversarial training, L2.
  pgd_linf    PGD adversarial training, Linf.
  trades      TRADES, L2.
  trades_linf TRADES, Linf.
  runlocal    the pgd variant for a few steps on 200 images (tests).
"""

import ml_collections

from advalign_jax.training.config_blocks import (arrays_block, eval_attack_block, model_block, objective_block,
                                                 optimizer_block, schedule_block, trainer_fields)

VARIANTS = ("vanilla", "pgd", "pgd_linf", "trades", "trades_linf", "runlocal")


def get_config(arg: str = "pgd"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}: use {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.model = model_block("small_cnn", num_classes=10, widths=(32, 64, 128), patch=2, input_size=16, norm="none")
    c.data_kind = "arrays"
    c.arrays = arrays_block("digits")
    c.data = ml_collections.ConfigDict({"batch_size": 64})
    c.objective = objective_block("ce")
    c.optimizer = optimizer_block("adam")
    c.schedule = schedule_block("constant", base_lr=1e-3)
    c.eval_attack = eval_attack_block(eps=1.0, steps=20, step_size=2.5 / 20, relative_step=True,
                                      random_start="none", start_radius=0.0)
    trainer_fields(c, workdir=f"results/adversarial_digits_{arg}")
    c.steps_per_epoch = 1437 // 64
    c.total_steps = 40 * c.steps_per_epoch
    c.log_every = 50
    c.checkpoint_every = 300
    if arg in ("pgd", "runlocal"):
        c.objective = objective_block("adversarial")
        c.objective.adversarial.update(dict(constraint="l2", eps=1.0, step_size=0.25, steps=7))
    elif arg == "pgd_linf":
        c.objective = objective_block("adversarial")
        c.objective.adversarial.update(dict(constraint="linf", eps=0.1, step_size=0.025, steps=7))
    elif arg == "trades":
        c.objective = objective_block("trades")
        c.objective.adversarial.update(dict(constraint="l2", eps=1.0, step_size=0.2, steps=10, beta=6.0))
    elif arg == "trades_linf":
        c.objective = objective_block("trades")
        c.objective.adversarial.update(dict(constraint="linf", eps=0.1, step_size=0.02, steps=10, beta=6.0))
    if arg == "runlocal":
        c.model.options.widths = (8, 16)
        c.arrays.limit = 200
        c.arrays.eval_limit = 64
        c.data.batch_size = 16
        c.total_steps = 6
        c.steps_per_epoch = 12
        c.log_every = 2
        c.checkpoint_every = 3
        c.eval_attack.steps = 3
        c.objective.adversarial.steps = 3
    return c
