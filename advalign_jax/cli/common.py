"""What the config-driven commands share: their arguments, their config (loaded with the multi-process
start-up first), which process prints, and the text table of a summary."""

from __future__ import annotations

import jax

from advalign_jax import parallel, store
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


def config_arguments(parser, default_config: str) -> None:
    """``--config FILE.py[:VARIANT]`` and ``--no-progress``, as every config-driven job takes them."""
    parser.add_argument("--config", default=default_config,
                        help=f"config FILE.py[:VARIANT] (default {default_config}); override fields with "
                             "--config.KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def text_table(columns, rows) -> str:
    """``rows`` (dicts) as right-aligned text columns under a header (values through ``store.fmt``)."""
    table = [list(columns)] + [[store.fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(line[k]) for line in table) for k in range(len(table[0]))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)
