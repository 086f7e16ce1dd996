"""Evaluation: the science of each study on one protocol.

- the protocol (:mod:`~advalign_jax.evaluation.protocol`: an evaluator, its sources, the one batch loop)
  and the resumable job around it (:mod:`~advalign_jax.evaluation.job`);
- the measurements: :mod:`~advalign_jax.evaluation.metrics` (Spearman, perturbation mask, norms, Dice,
  IoU), :mod:`~advalign_jax.evaluation.saliency`, :mod:`~advalign_jax.evaluation.stats` (bootstrap
  intervals, Wilcoxon), :mod:`~advalign_jax.evaluation.summaries` (intervals and paired comparisons of
  per-image rows);
- the ClickMe evaluations (:mod:`~advalign_jax.evaluation.clickme`): the adversarial-alignment study
  (:mod:`~advalign_jax.evaluation.adversarial_alignment`, ``advalign-jax evaluate``), the human-alignment
  score (:mod:`~advalign_jax.evaluation.human_alignment`, ``advalign-jax evaluate-clickme``) and the
  cue-swap test (:mod:`~advalign_jax.evaluation.cue_swap`);
- robust accuracy under PGD and AutoAttack (:mod:`advalign_jax.evaluation.robust`,
  ``advalign-jax evaluate-robust``, and the trainer's per-epoch check);
- the trainer's clean accuracy on ClickMe records (:mod:`~advalign_jax.evaluation.accuracy`);
- printed tables and figures (:mod:`~advalign_jax.evaluation.tables`, :mod:`~advalign_jax.evaluation.figures`).
"""
