"""Robust accuracy of a classifier on in-memory images: clean, PGD, APGD, FAB, Square and AutoAttack.

An evaluation is a list of attacks, each with a name and a radius:

- :class:`PGDAttack`: any :class:`~advalign_jax.attacks.pgd.PGDConfig` (Madry-lab conventions),
  untargeted, or targeted at class ``(y + 1) mod C`` (``target='next'``: the other class of a binary
  task, the PAG toy evaluation); :func:`pgd_attack` builds the usual evaluation (``steps`` steps of
  ``2.5 eps / steps``, best-loss iterate, no random start) and :data:`PAG_EPOCH_EVAL` the PAG
  official per-epoch check (untargeted L2, eps 0.5, 7 steps of ``1.5 eps / 7``, random start uniform
  in ``+-8/255`` per pixel, last iterate; royg27/PAG-ROB ``TRAIN_CIFAR10.py``'s evaluation; PAG's mean
  cross-entropy and our per-example one give the same normalised L2 step).
- :class:`Cascade`: stages run as AutoAttack runs its attacks, each on the points still robust
  after the previous ones (:mod:`advalign_jax.attacks.autoattack`); a stage is APGD
  (:class:`~advalign_jax.attacks.apgd.APGDConfig`), FAB (:class:`~advalign_jax.attacks.fab.FABConfig`)
  or Square (:class:`~advalign_jax.attacks.square.SquareConfig`). :func:`autoattack_attack` builds
  AutoAttack itself, ``standard`` (APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, Square
  with 5,000 queries: the field's robustness number), ``plus`` or ``rand``; :func:`single_attack`
  one of its attacks on its own; :func:`autoattack_whitebox` its APGD-CE + APGD-T part. With C classes
  the targeted stages use ``min(9, C - 1)`` targets. Each stage attacks only the survivors of the
  previous ones, gathered at the front of the batch and attacked a chunk at a time (a quarter of the
  batch by default), so the later stages cost what their survivors cost; the results are those of
  attacking the whole batch with the others masked (every example's draws come from its index).

Default radii are RobustBench's for CIFAR-sized images: L2 0.5, Linf 8/255 (:data:`ROBUSTBENCH_EPS`).

**What is reported** (AutoAttack's convention): an example is *robust* under an attack when the
model classifies it correctly both clean and at the attack's returned point (the prediction is
recomputed there, as AutoAttack's final check does); robust accuracy is the fraction of robust
examples, so it never exceeds the clean accuracy. ``adversarial_accuracy`` (correct at the returned
point whatever the clean prediction: the ``robustness`` library's and PAG's number) is reported too,
the robust accuracy after each stage of a cascade and the time each stage took (RobustBench's report:
clean accuracy, robust accuracy after each attack, the final figure), and ``robust_to_all``: the
fraction robust under every attack of the list (the per-example worst case). Every attack and every
stage is its own compiled function; its time is the wall-clock time of its calls, compilation
excluded (the job's ``wall_time_s`` includes it).

**Checks** (AutoAttack's, :mod:`advalign_jax.attacks.autoattack`): before the attacks, on the first
batch, whether the model looks randomised (two forward passes differ), whether its outputs look like
probabilities, whether inputs lie outside the pixel box, whether a targeted stage asks for more targets
than there are classes; after them, points with a zero input gradient, Square breaking points the
gradient-based stages could not, and later stages breaking points far inside the radius. Each check
that fires is logged as a warning and named in the summary's ``checks`` column.

The evaluation runs on the evaluation protocol (:mod:`advalign_jax.evaluation.protocol`): the
robust evaluator's batches are those of an :class:`~advalign_jax.evaluation.protocol.ArraySource` of a
fixed size (the last one padded, with a mask, so no example is dropped and one compiled function serves
every batch), sharded over a device mesh when one is given. Every random draw of an example comes from
its dataset index (``fold_in``), and the model must be in inference mode, so an example's result does
not depend on its batch mates, the batch size or the number of devices (up to floating-point summation
order).

**The job** (``advalign-jax evaluate-robust``, ``configs/robustness.py``,
:mod:`advalign_jax.evaluation.robust.job`): one model directory, one dataset from
:func:`advalign_jax.data.images.load_arrays` (or ``embedded``: the embedded synthetic ClickMe records the
demonstration checkpoints were trained on), the attacks of ``config.attacks``, resumable in its workdir.

The modules: :mod:`~advalign_jax.evaluation.robust.attacks` (the attack specifications),
:mod:`~advalign_jax.evaluation.robust.sequence` (the per-batch computation),
:mod:`~advalign_jax.evaluation.robust.summary` (the bookkeeping and the checks),
:mod:`~advalign_jax.evaluation.robust.files` (rows and files), :mod:`~advalign_jax.evaluation.robust.evaluator`
(the evaluator and the in-memory evaluations), :mod:`~advalign_jax.evaluation.robust.job` (the command's job).
"""

from advalign_jax.evaluation.robust.attacks import (
    ATTACK_KINDS, PAG_EPOCH_EVAL, ROBUSTBENCH_EPS, SINGLE, Attack, Cascade, PGDAttack, attacks_from_config,
    autoattack_attack, autoattack_whitebox, default_attacks, pgd_attack, single_attack)
from advalign_jax.evaluation.robust.evaluator import clean_accuracy, epoch_metrics, evaluate_robustness, robust_evaluator
from advalign_jax.evaluation.robust.files import SUMMARY_COLUMNS, format_summary, per_example_columns, summary_rows
from advalign_jax.evaluation.robust.job import evaluate
from advalign_jax.evaluation.robust.summary import RobustnessResult, summarise

__all__ = ["ATTACK_KINDS", "PAG_EPOCH_EVAL", "ROBUSTBENCH_EPS", "SINGLE", "Attack", "Cascade", "PGDAttack",
           "attacks_from_config", "autoattack_attack", "autoattack_whitebox", "default_attacks", "pgd_attack",
           "single_attack", "clean_accuracy", "epoch_metrics", "evaluate_robustness", "robust_evaluator",
           "SUMMARY_COLUMNS", "format_summary", "per_example_columns", "summary_rows", "evaluate",
           "RobustnessResult", "summarise"]
