"""``python -m advalign_jax`` is ``advalign-jax``."""
import sys

from advalign_jax.cli.main import main

sys.exit(main())
