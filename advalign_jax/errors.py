"""User-facing errors: each carries one line that names what was wrong and where.

The command line prints ``advalign-jax: error: <line>`` for these and exits with status 2; any other
exception is a bug and keeps its traceback.
"""


class AdvalignError(Exception):
    """Bad input from the user (a file, a record, a config key, a flag): one clear line."""


class DataError(AdvalignError):
    """A data file or record that cannot be read as the configured format."""


class ConfigError(AdvalignError):
    """A config file, key or value that is not valid."""
