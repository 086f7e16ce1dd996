"""What the config-driven commands share: their config, loaded with the multi-process start-up first,
and which process prints."""

from __future__ import annotations

import jax

from advalign_jax import parallel
from advalign_jax.config import load_config


def job_config(args):
    """The command's config, with the multi-process runtime started first when it asks for it
    (``--config.distributed=true``): that must precede every other JAX call."""
    config = load_config(args.config, args.config_overrides)
    if "distributed" in config and bool(config.distributed):
        parallel.initialize_distributed(True)
    return config


def lead() -> bool:
    """Whether this process prints the command's results (process 0 of a multi-process run)."""
    return jax.process_index() == 0
