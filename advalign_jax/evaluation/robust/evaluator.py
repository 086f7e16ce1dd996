"""The robust-accuracy evaluator on the evaluation protocol, and the in-memory evaluations built on it.

:func:`robust_evaluator` is the :class:`~advalign_jax.evaluation.protocol.Evaluator` of a list of
attacks: its batch function is the compiled :class:`~advalign_jax.evaluation.robust.sequence.AttackSequence`
on batches ``x, y, index, mask`` of an :class:`~advalign_jax.evaluation.protocol.ArraySource`, its rows
the per-example rows of ``per_example.csv`` (:mod:`advalign_jax.evaluation.robust.files`), its summary
:func:`~advalign_jax.evaluation.robust.summary.summarise`. :func:`evaluate_robustness` runs it over
arrays in memory (:func:`~advalign_jax.evaluation.protocol.evaluate_all`), :func:`epoch_metrics` gives
the trainer's per-epoch numbers, :func:`clean_accuracy` the same loop with no attack;
``advalign-jax evaluate-robust`` runs it inside the resumable job (:mod:`advalign_jax.evaluation.robust.job`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from advalign_jax.errors import ConfigError, DataError
from advalign_jax.evaluation.protocol import ArraySource, Evaluator, evaluate_all, run_batches
from advalign_jax.evaluation.robust.attacks import PAG_EPOCH_EVAL, Attack, check_attacks, default_attacks
from advalign_jax.evaluation.robust.files import arrays_from_rows, example_rows, per_example_columns
from advalign_jax.evaluation.robust.sequence import DEFAULT_CHUNKS, compiled_sequence
from advalign_jax.evaluation.robust.summary import RobustnessResult, add_seconds, pre_checks, summarise, warn_all


def checked_arrays(images, labels, batch_size: int) -> tuple:
    """Checked inputs: float32 images and int32 labels of the same length, a positive batch size."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim < 2 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"images {images.shape} and labels {labels.shape} must hold the same number of examples")
    if images.shape[0] == 0:
        raise DataError("no examples to evaluate")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    return (images.astype(np.float32) if images.dtype != np.float32 else images), labels.astype(np.int32)


def robust_evaluator(apply_fn: Callable, attacks: Sequence[Attack], key, source: ArraySource, mesh=None,
                     chunks: int = DEFAULT_CHUNKS, keep_adversarial: bool = False, checks: Optional[dict] = None,
                     seconds: Optional[dict] = None) -> Evaluator:
    """The evaluator of ``attacks`` over the batches of ``source`` (every random draw from ``key`` and
    the example's index). ``apply_fn(variables, x) -> logits`` in inference mode. ``checks``: the
    checks made before the attacks (:func:`pre_checks`), named in the summary; ``seconds``: the
    ``{(attack, stage): seconds}`` of earlier runs, to which each batch's times are added."""
    attacks = check_attacks(attacks)
    sequence = compiled_sequence(apply_fn, attacks, keep_adversarial, mesh, source.batch_size, int(chunks))
    seconds = {} if seconds is None else seconds

    def batch_fn(variables, b):
        out = sequence(variables, b["x"], b["y"], b["index"], b["mask"], key)
        add_seconds(seconds, sequence.seconds)
        return out

    return Evaluator(batch_fn=batch_fn, inputs=("x", "y", "index", "mask"),
                     rows=lambda meta, host: example_rows(meta, host, attacks),
                     summarise=lambda rows: summarise(arrays_from_rows(rows, attacks), attacks, checks, seconds),
                     columns=per_example_columns(attacks))


def evaluate_robustness(apply_fn: Callable, variables: Any, images, labels, attacks: Optional[Sequence[Attack]] = None,
                        batch_size: int = 256, key=None, mesh=None, keep_adversarial: bool = False,
                        progress: bool = False, checks: bool = True, clip=(0.0, 1.0),
                        chunks: int = DEFAULT_CHUNKS) -> RobustnessResult:
    """Runs ``attacks`` (default :func:`default_attacks`) on every example; returns a
    :class:`RobustnessResult` (the summary and the per-example arrays, ``NAME/x_adv`` included with
    ``keep_adversarial``). ``key``: the PRNG key of all random draws (default ``PRNGKey(0)``);
    ``mesh``: shard each batch over it (every process passes the whole dataset); ``checks``: run
    AutoAttack's checks (logged as warnings and listed in the summary), with ``clip`` the pixel box of
    the input-range check; ``chunks``: cascade stages attack their survivors in pieces of
    ``1 / chunks`` of the batch."""
    attacks = check_attacks(default_attacks() if attacks is None else attacks)
    images, labels = checked_arrays(images, labels, batch_size)
    found = pre_checks(apply_fn, variables, images, labels, attacks, clip, batch_size) if checks else {}
    source = ArraySource({"x": images, "y": labels}, batch_size, mesh)
    evaluator = robust_evaluator(apply_fn, attacks, jax.random.PRNGKey(0) if key is None else key, source, mesh,
                                 chunks, keep_adversarial, found)
    rows = []
    for b, result in enumerate(run_batches(evaluator, variables, source, mesh)):
        rows += evaluator.rows(result.meta, result.host)
        if progress:
            print(f"robustness: batch {b + 1}/{len(source)}", file=sys.stderr)
    per_example = arrays_from_rows(rows, attacks)
    summary = evaluator.summarise(rows)
    if checks:
        warn_all(summary)
    return RobustnessResult(summary, per_example)


def clean_accuracy(apply_fn: Callable, variables: Any, images, labels, batch_size: int = 256, mesh=None) -> float:
    """Top-1 accuracy on in-memory ``images`` (the robust evaluator with no attack)."""
    images, labels = checked_arrays(images, labels, batch_size)
    source = ArraySource({"x": images, "y": labels}, batch_size, mesh)
    evaluator = robust_evaluator(apply_fn, (), jax.random.PRNGKey(0), source, mesh)
    return evaluate_all(evaluator, variables, source, mesh)["clean_accuracy"]


def epoch_metrics(apply_fn: Callable, variables: Any, images, labels, attacks: Sequence[Attack] = (PAG_EPOCH_EVAL,),
                  mesh=None, batch_size: int = 256, key=None) -> dict:
    """The trainer's per-epoch numbers on a held-out array set: ``eval_accuracy`` (clean),
    ``eval_robust_accuracy`` (robust under every attack, AutoAttack's convention) and, with several
    attacks, ``eval_robust_accuracy/NAME`` for each. The compiled sequence is cached, so calling this
    every epoch compiles once."""
    s = evaluate_robustness(apply_fn, variables, images, labels, attacks, batch_size=batch_size, key=key,
                            mesh=mesh, checks=False).summary
    out = {"eval_accuracy": s["clean_accuracy"], "eval_robust_accuracy": s["robust_to_all"]}
    if len(s["attacks"]) > 1:
        out.update({f"eval_robust_accuracy/{name}": a["robust_accuracy"] for name, a in s["attacks"].items()})
    return out
