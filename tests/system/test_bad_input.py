"""Bad input: one clear line naming the file and record (or key), exit status 2, nothing half-written."""

import os

import numpy as np
import pytest

from advalign_jax.cli.main import main
from advalign_jax.data import reader as reader_lib
from advalign_jax.data import records
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import DataError

tf = import_tf()

GOOD_IMG = np.full((32, 32, 3), 100.0, np.float32)
GOOD_MAP = np.full((32, 32), 50.0, np.float32)


def _example(image=None, heatmap=None, label=1, drop=(), label_bytes=False):
    image = records.encode_feature(GOOD_IMG, records.JPEG) if image is None else image
    heatmap = records.encode_feature(GOOD_MAP, records.JPEG) if heatmap is None else heatmap
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "heatmap": tf.train.Feature(bytes_list=tf.train.BytesList(value=[heatmap])),
        "label": (tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"7"])) if label_bytes
                  else tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))),
    }
    for k in drop:
        del feature[k]
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _file(tmp_path, bad, position=3, n=6, name="train-0.tfrecords"):
    """A shard of n good records with `bad` (serialized) at `position`."""
    path = str(tmp_path / name)
    with tf.io.TFRecordWriter(path) as w:
        for i in range(n):
            w.write(bad if i == position else _example(label=i % 10))
    return path


BAD_RECORDS = {
    "no_image": (_example(drop=("image",)), "record 3: the record has no 'image' feature"),
    "no_heatmap": (_example(drop=("heatmap",)), "record 3: the record has no 'heatmap' feature"),
    "no_label": (_example(drop=("label",)), "record 3: the record has no 'label' feature"),
    "not_image_bytes": (_example(image=b"\x00" * 1001), "record 3: 'image' bytes are neither a JPEG nor raw"),
    "label_range": (_example(label=12), "record 3: label 12 is outside the configured class range [0, 10)"),
    "nonfinite": (_example(image=np.full((32, 32, 3), np.nan, np.float32).tobytes(),
                           heatmap=GOOD_MAP.tobytes()), "record 3: raw float32 'image' holds non-finite"),
    "corrupt_jpeg": (_example(image=records.JPEG_MAGIC + b"\xe0garbage" * 50),
                     "record 3: 'image' is not a decodable JPEG"),
    "label_type": (_example(label_bytes=True), "record 3: feature 'label' must hold exactly one int64"),
}


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_one_line_with_file_and_index(tmp_path, capsys, case):
    bad, expected = BAD_RECORDS[case]
    path = _file(tmp_path, bad)
    png = tmp_path / "grid.png"
    code, err = _run(capsys, "data", "inspect", path, "--num-classes", "10", "--out", str(png))
    assert code == 2
    assert err.count("\n") == 0, err
    assert err.startswith("advalign-jax: error: ") and path in err and expected in err, err
    assert not png.exists()  # nothing written
    # The reader gives the same line, in eval mode and in train mode.
    for mode in ("eval", "train"):
        cfg = reader_lib.ReaderConfig(files=(path,), batch_size=2, num_classes=10, mode=mode, image_size=16)
        with pytest.raises(DataError) as info:
            for _ in reader_lib.ClickMeReader(cfg, 0, 1).take(5):
                pass
        assert path in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_skip_bad_records_skips_and_counts(tmp_path, capsys, case):
    bad, _ = BAD_RECORDS[case]
    path = _file(tmp_path, bad)
    code = main(["data", "inspect", path, "--num-classes", "10", "--skip-bad-records",
                 "--out", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert code == 0 and "records: 5 valid, 1 skipped" in out, out
    cfg = reader_lib.ReaderConfig(files=(path,), batch_size=4, num_classes=10, image_size=16,
                                  skip_bad_records=True)
    r = reader_lib.ClickMeReader(cfg, 0, 1)
    batches = list(r)
    assert sum(int(b["mask"].sum()) for b in batches) == 5 and r.skipped == 1
    assert sorted(np.concatenate([b["index"][b["mask"]] for b in batches])) == [0, 1, 2, 4, 5]


def _damaged(tmp_path, kind):
    path = _file(tmp_path, _example(), n=5)
    data = bytearray(open(path, "rb").read())
    if kind == "truncated":
        data = data[:-20]
    elif kind == "corrupt":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray(b"this is not a tfrecord file " * 20)
    open(path, "wb").write(bytes(data))
    return path


@pytest.mark.parametrize("kind,expected", [("truncated", "record 4: truncated TFRecord"),
                                           ("corrupt", "corrupt TFRecord"),
                                           ("garbage", "record 0: not a TFRecord file")])
def test_damaged_files(tmp_path, capsys, kind, expected):
    path = _damaged(tmp_path, kind)
    code, err = _run(capsys, "data", "inspect", path, "--num-classes", "10", "--out", str(tmp_path / "g.png"))
    assert code == 2 and err.count("\n") == 0 and path in err and expected in err, err
    for mode in ("eval", "train"):
        cfg = reader_lib.ReaderConfig(files=(path,), batch_size=2, num_classes=10, mode=mode, image_size=16)
        with pytest.raises(DataError, match=expected):
            for _ in reader_lib.ClickMeReader(cfg, 0, 1).take(10):
                pass
    # Skipping keeps the readable records and counts the damaged tail.
    cfg = reader_lib.ReaderConfig(files=(path,), batch_size=8, num_classes=10, image_size=16,
                                  skip_bad_records=True)
    r = reader_lib.ClickMeReader(cfg, 0, 1)
    n = sum(int(b["mask"].sum()) for b in r)
    assert r.skipped >= 1 and n == r.num_records


def test_pattern_matching_nothing(tmp_path, capsys):
    code, err = _run(capsys, "data", "inspect", str(tmp_path / "nothing-*.tfrecords"))
    assert code == 2 and "no file matches" in err and "nothing-*.tfrecords" in err and err.count("\n") == 0


def test_unknown_config_key_and_bad_values(tmp_path, capsys):
    out = tmp_path / "synth"
    code, err = _run(capsys, "data", "synth", "--config", "configs/synthetic_clickme.py:runlocal",
                     "--config.num_imagez=3", "--out", str(out))
    assert code == 2 and "unknown config key 'num_imagez'" in err and err.count("\n") == 0
    code, err = _run(capsys, "data", "synth", "--config", "configs/synthetic_clickme.py:runlocal",
                     "--config.num_images=many", "--out", str(out))
    assert code == 2 and "num_images=many" in err
    code, err = _run(capsys, "data", "synth", "--config", "configs/synthetic_clickme.py:runlocal",
                     "--config.encoding=png", "--out", str(out))
    assert code == 2 and "encoding" in err
    assert not out.exists()  # nothing written


def test_synth_refuses_to_overwrite(tmp_path, capsys):
    args = ["data", "synth", "--config", "configs/synthetic_clickme.py:runlocal",
            "--config.num_images=4", "--out", str(tmp_path)]
    assert main(args) == 0
    before = {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path)}
    code, err = _run(capsys, *args)
    assert code == 2 and "already exists" in err
    assert {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path)} == before


def test_label_range_is_configurable_in_the_reader(tmp_path):
    path = _file(tmp_path, _example(label=999))
    cfg = reader_lib.ReaderConfig(files=(path,), batch_size=8, num_classes=1000, image_size=16)
    batch = next(iter(reader_lib.ClickMeReader(cfg, 0, 1)))
    assert 999 in batch["label"]


def test_an_unknown_order_of_differentiation_is_one_config_error():
    import ml_collections

    from advalign_jax.errors import ConfigError
    from advalign_jax.training.config_blocks import objective_block
    from advalign_jax.training.objectives import harmonizer
    from advalign_jax.training.objectives import pag as pag_objective

    with pytest.raises(ConfigError, match="objective.differentiation must be 'auto' or one of"):
        harmonizer.loss(None, {}, {}, {}, None, ml_collections.ConfigDict({"differentiation": "bogus"}))
    with pytest.raises(ConfigError, match="objective.differentiation must be 'auto' or one of"):
        pag_objective.pag_config(objective_block("pag", differentiation="bogus"))
