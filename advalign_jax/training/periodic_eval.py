"""The trainer's evaluation, every ``eval_every`` steps and at the end, built once per run.

- ClickMe data (``data_kind='clickme'``): clean top-1 accuracy on the records of ``eval_data``
  (:func:`advalign_jax.evaluation.accuracy.clickme_accuracy`), as ``eval_accuracy``; nothing when
  ``eval_data.files`` is empty.
- Array data (``data_kind='arrays'``): clean and robust accuracy on the test split of ``config.arrays``
  under the ``eval_attack`` block's PGD (:func:`advalign_jax.evaluation.robust.epoch_metrics`; a targeted
  attack aims at class ``(y + 1) mod C``, the other class of a binary task; robust means correct clean
  and attacked), as ``eval_accuracy`` and ``eval_robust_accuracy``; its random draws come from
  ``PRNGKey(seed + 7)``.

Both run on the evaluation protocol (:mod:`advalign_jax.evaluation.protocol`) with the model in
inference mode, sharded over the trainer's mesh.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from advalign_jax.attacks.pgd import PGDConfig
from advalign_jax.data.images import load_arrays
from advalign_jax.evaluation.accuracy import clickme_accuracy
from advalign_jax.evaluation.robust import PGDAttack, epoch_metrics
from advalign_jax.training.step import variables_of


def eval_attack_config(c):
    """The PGDConfig and radius of the ``eval_attack`` block."""
    a = c.eval_attack
    cfg = PGDConfig(norm=a.norm, steps=int(a.steps), step_size=float(a.step_size), relative_step=bool(a.relative_step),
                    projection="ball", random_start=a.random_start,
                    start_radius=float(a.start_radius) if a.start_radius else None,
                    targeted=a.target != "none", clip=tuple(a.clip) if len(a.clip) else None)
    return cfg, float(a.eps)


def eval_attacks(c) -> list:
    """The ``eval_attack`` block as the robust evaluation's attack list."""
    attack, eps = eval_attack_config(c)
    return [PGDAttack("eval", eps, attack, target=c.eval_attack.target)]


@functools.lru_cache(maxsize=2)
def held_out_arrays(source, split, data_dir, limit):
    """The evaluation split, read once per process rather than at every evaluation."""
    return load_arrays(source, split, data_dir, limit)


def test_split(c) -> tuple:
    """The test split of ``config.arrays`` (what the array-data evaluation uses)."""
    a = c.arrays
    return held_out_arrays(a.source, a.test_split, a.data_dir or None, a.eval_limit if a.eval_limit > 0 else None)


def make_evaluation(config, model, mesh) -> Callable[[dict], dict]:
    """``evaluate(state) -> {metric: value}`` for this run (the module docstring)."""
    if config.data_kind == "arrays":
        attacks = eval_attacks(config)
        key = jax.random.PRNGKey(int(config.seed) + 7)

        def arrays(state):
            x, y = test_split(config)
            return epoch_metrics(model.apply, variables_of(state), x, y, attacks, mesh=mesh, batch_size=256, key=key)

        return arrays
    if not config.eval_data.files:
        return lambda state: {}
    return lambda state: {"eval_accuracy": clickme_accuracy(model.apply, variables_of(state), config.eval_data, mesh)}
