"""advalign_jax: adversarial robustness and human alignment of vision models, in JAX.

Subpackages (each imports on its own; nothing heavy is imported here):

- ``advalign_jax.data``: ClickMe TFRecords through tf.data, the writer and synthetic data.
- ``advalign_jax.parallel``: device meshes, batch and state placement, multi-host start-up.
- ``advalign_jax.config``: loading ``configs/*.py`` with locked command-line overrides.
- ``advalign_jax.cli``: the ``advalign-jax`` command.
"""

__version__ = "0.1.0"
