"""Training objectives, one module each, named by ``config.objective.name``.

Every module defines ``loss(model, params, model_state, batch, rng, cfg) -> (loss, (new_model_state,
metrics))``. Adding an objective is adding a file.
"""

import importlib

from advalign_jax.errors import ConfigError


def get(name: str):
    """The objective module ``advalign_jax.training.objectives.<name>``."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise ConfigError(f"objective.name {name!r} names no module in advalign_jax/training/objectives") from None
