"""Configs: every file loads in every variant, is locked, and overrides parse by field type."""

import glob
import os

import ml_collections
import pytest

from advalign_jax import config as config_lib
from advalign_jax.errors import ConfigError

CONFIGS = sorted(glob.glob(os.path.join(config_lib.CONFIG_DIR, "*.py")))


def _variants(path):
    """Variant names listed in a config's docstring (lines of the form '  name   description')."""
    import ast

    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    section = doc.split("Variants (``:ARG``):", 1)
    if len(section) == 1:
        return [None]
    import re

    return [m.group(1) for m in re.finditer(r"^  (\w+)\s", section[1], flags=re.M)]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_locked_with_a_documented_command(path):
    text = open(path).read()
    assert "advalign-jax" in text and "Expected result" in text  # the docstring's command and result
    for variant in _variants(path):
        spec = path if variant is None else f"{path}:{variant}"
        cfg = config_lib.load_config(spec)
        assert isinstance(cfg, ml_collections.ConfigDict) and cfg.is_locked
        with pytest.raises(AttributeError):
            cfg.this_key_does_not_exist = 1
    assert "runlocal" in _variants(path)  # every job has its tiny local mode


def test_overrides_parse_by_type():
    cfg = config_lib.load_config("configs/synthetic_clickme.py:runlocal",
                                 ["num_images=7", "spurious=1", "encoding=raw_float32", "prefix=x y"])
    assert cfg.num_images == 7 and cfg.spurious == 1.0 and isinstance(cfg.spurious, float)
    assert cfg.encoding == "raw_float32" and cfg.prefix == "x y"


def test_nested_and_tuple_overrides():
    cfg = ml_collections.ConfigDict({"data": {"files": ("a",), "flip": True, "lr": 0.1}})
    cfg.lock()
    config_lib.apply_overrides(cfg, ["data.files=('x.tfrecords', 'y.tfrecords')", "data.flip=false"])
    assert cfg.data.files == ("x.tfrecords", "y.tfrecords") and cfg.data.flip is False
    config_lib.apply_overrides(cfg, ["data.files=['z']"])
    assert cfg.data.files == ("z",)
    with pytest.raises(ConfigError, match="unknown config key 'data.flop'"):
        config_lib.apply_overrides(cfg, ["data.flop=1"])
    with pytest.raises(ConfigError, match="is a block"):
        config_lib.apply_overrides(cfg, ["data=1"])
    with pytest.raises(ConfigError, match="expected true or false"):
        config_lib.apply_overrides(cfg, ["data.flip=maybe"])
    with pytest.raises(ConfigError):
        config_lib.apply_overrides(cfg, ["data.lr=fast"])


def test_split_overrides():
    rest, over = config_lib.split_overrides(["data", "synth", "--config.a=1", "--config.b", "2", "--out", "x"])
    assert rest == ["data", "synth", "--out", "x"] and over == ["a=1", "b=2"]


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        config_lib.load_config("configs/nope.py")
