"""Robust models as image generators and the robust-features datasets.

- :mod:`~advalign_jax.synthesis.ops`: the input-space manipulations (generation, representation
  matching and inversion, interpolation, feature visualisation) as pure functions over the project's PGD;
- :mod:`~advalign_jax.synthesis.representation`: the layer a manipulation reads (the penultimate
  features through the fake ReLU by default);
- :mod:`~advalign_jax.synthesis.synthesize`: ``advalign-jax synthesize``;
- :mod:`~advalign_jax.synthesis.construct`: ``advalign-jax construct`` (det, rand, robust, non_robust);
- :mod:`~advalign_jax.synthesis.items`: the resumable runs whose results are images.
"""
