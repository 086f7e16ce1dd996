"""Configs: one ``ml_collections`` file per job under ``configs/``, locked, with command-line overrides.

A config file defines ``get_config(arg=None)`` returning a ``ConfigDict``; ``arg`` selects a variant
(``configs/x.py:runlocal`` is the tiny local mode of every job). On the command line::

    advalign-jax JOB --config configs/x.py[:ARG] --config.key=value --config.block.key=value

The returned config is **locked**: an override or a typo naming a key that the file does not define is
an error (:class:`advalign_jax.errors.ConfigError`), never a new key. Values are parsed with the type of
the field they replace (``--config.lr=0.1``, ``--config.files="('a.tfrecords', 'b.tfrecords')"``,
``--config.use_bf16=true``; strings need no quotes).
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Sequence

import ml_collections

from advalign_jax.errors import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_config_path(path: str) -> pathlib.Path:
    """A config path as given, else relative to the repository (so ``configs/x.py`` works anywhere)."""
    candidates = [pathlib.Path(path), REPO_ROOT / path, CONFIG_DIR / path]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise ConfigError(f"config file {path!r} not found (looked in ., {REPO_ROOT} and {CONFIG_DIR})")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path.py[:arg]``, applies ``key=value`` overrides, returns the locked config."""
    path, _, arg = spec.partition(":")
    file = resolve_config_path(path)
    module_name = f"_advalign_config_{file.stem}"
    loader_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:
        raise ConfigError(f"{file}: cannot be loaded: {type(err).__name__}: {err}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file}: defines no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{file}: get_config({arg!r}) failed: {type(err).__name__}: {err}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{file}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    apply_overrides(config, overrides, source=spec)
    return config


def _parse_value(text: str, current, key: str):
    """Parses ``text`` as the type of ``current`` (the field's value in the file)."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text  # an unset field: take the string as is
        raise ConfigError(f"--config.{key}={text}: not a valid {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and isinstance(value, (str, int, float)):
        value = (value,)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str], source: str = "config"):
    """Applies ``key.sub=value`` strings to a locked config; unknown keys raise ConfigError."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if key.startswith("--config."):
            key = key[len("--config."):]
        if not sep or not key:
            raise ConfigError(f"config override {item!r} must look like --config.KEY=VALUE")
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:depth]) or "the top level"
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ConfigError(f"unknown config key {key!r} in {source}: no {part!r} at {where} "
                                  f"(known: {', '.join(known)})")
            if depth < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a block; override its fields ({key}.FIELD=...)")
        value = _parse_value(text, current, key)
        try:
            node[parts[-1]] = value
        except TypeError as err:
            raise ConfigError(f"--config.{key}={text}: {err}") from None
    return config


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.KEY=VALUE`` (and ``--config.KEY VALUE``) from the other arguments."""
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg[len("--config."):])
            elif i + 1 < len(argv):
                overrides.append(f"{arg[len('--config.'):]}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"{arg} needs a value")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """A plain, JSON-friendly dict of the config (for saving next to results)."""
    return config.to_dict()

