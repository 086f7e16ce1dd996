"""The end of a training run: the model directory every command loads (``WORKDIR/model`` or
``export_to``), written by process 0 with the final parameters and BatchNorm statistics."""

from __future__ import annotations

import os

from advalign_jax import parallel
from advalign_jax.errors import writing
from advalign_jax.models import get_model, save_model


def final_variables(state) -> dict:
    """The model variables of a (replicated) train state, as host arrays."""
    out = {"params": parallel.replicated_to_host(state["params"])}
    if "batch_stats" in state:
        out["batch_stats"] = parallel.replicated_to_host(state["batch_stats"])
    return out


def export_model(config, state, export: str, workdir: str) -> None:
    """Writes the model directory ``export`` (the architecture with the config's options, in float32)."""
    plain = get_model(config.model.name, **config.model.options.to_dict())
    with writing(export):
        save_model(export, plain, final_variables(state), source=f"trained: {os.path.abspath(workdir)}",
                   overwrite=True)
