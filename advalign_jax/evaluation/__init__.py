"""Evaluation: metrics, the adversarial-alignment run, and (with training) the human-alignment score.

- :mod:`advalign_jax.evaluation.metrics`: Spearman (average ranks), perturbation mask, norms, Dice, IoU;
- :mod:`advalign_jax.evaluation.adversarial_alignment`: ``advalign-jax evaluate``.
"""
