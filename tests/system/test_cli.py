"""The command line: --help everywhere, and synth -> inspect end to end through the console script."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from advalign_jax.cli.main import build_parser, main


def _subcommands(parser, prefix=()):
    """Every (sub)command path of the parser, e.g. ('data', 'synth')."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _subcommands(sub, prefix + (name,))


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in {path[0] for path in _subcommands(build_parser())}:
        assert name in out


@pytest.mark.parametrize("path", list(_subcommands(build_parser())), ids=" ".join)
def test_every_subcommand_has_help(capsys, path):
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    assert "usage: advalign-jax" in capsys.readouterr().out


def test_console_script_synth_then_inspect(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "advalign-jax")
    out = tmp_path / "synth"
    run = subprocess.run([exe, "data", "synth", "--config", "configs/synthetic_clickme.py:runlocal",
                          "--config.encoding=raw_float32", "--config.size=32", "--out", str(out)],
                         capture_output=True, text=True, check=True)
    assert "wrote 24 raw_float32 records" in run.stdout
    report = tmp_path / "report.json"
    run = subprocess.run([exe, "data", "inspect", str(out / "train-*.tfrecords"), "--num-classes", "10",
                          "--out", str(tmp_path / "grid.png"), "--json", str(report)],
                         capture_output=True, text=True, check=True)
    assert "records: 24 valid" in run.stdout and "encoding: raw_float32 (24)" in run.stdout
    assert "label histogram" in run.stdout
    assert (tmp_path / "grid.png").stat().st_size > 1000
    data = json.loads(report.read_text())
    assert data["num_records"] == 24 and data["image_shapes"] == {"(32, 32, 3)": 24}
    assert sum(data["labels"].values()) == 24 and len(data["labels"]) == 10


def test_embedded_data_is_the_documented_synth_output(tmp_path):
    """The embedded shard is `data synth --config configs/synthetic_clickme.py:val` (README)."""
    from advalign_jax.data import embedded_files, records
    from advalign_jax.data.tf_env import import_tf

    tf = import_tf()
    assert main(["data", "synth", "--config", "configs/synthetic_clickme.py:val",
                 "--config.num_images=8", "--out", str(tmp_path)]) == 0
    fresh = list(tf.data.TFRecordDataset(str(tmp_path / "val-0.tfrecords")).as_numpy_iterator())
    shipped = list(tf.data.TFRecordDataset(embedded_files("val")).take(8).as_numpy_iterator())
    assert len(list(tf.data.TFRecordDataset(embedded_files("val")))) == 128
    for a, b in zip(fresh, shipped):
        ia, ib = records.describe_record(a, decode=True), records.describe_record(b, decode=True)
        assert ia.label == ib.label
        assert np.abs(ia.image - ib.image).mean() < 1.0  # same pixels up to JPEG codec versions
        assert np.abs(ia.heatmap - ib.heatmap).mean() < 1.0
