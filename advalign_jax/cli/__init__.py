"""The ``advalign-jax`` command: one module per subcommand group, each with ``add_parser``/``run``."""
