"""Record schema and the two real encodings: what is written is what the spec says, and reads back."""

import numpy as np
import pytest

from advalign_jax.data import records, writer
from advalign_jax.data.tf_env import import_tf

tf = import_tf()


def _features(serialized):
    return tf.train.Example.FromString(serialized).features.feature


def test_raw_encoding_layout_is_float32_hwc(rng):
    image = rng.uniform(0, 255, size=(224, 224, 3)).astype(np.float32)
    heat = rng.uniform(0, 255, size=(224, 224)).astype(np.float32)
    feats = _features(records.encode_example(image, heat, 417, records.RAW))
    assert set(feats.keys()) == {"image", "heatmap", "label"}
    img_bytes = feats["image"].bytes_list.value[0]
    assert len(img_bytes) == 224 * 224 * 3 * 4
    # What tf.io.decode_raw reads (the way the raw-float32 subset is consumed) is the array itself.
    decoded = tf.reshape(tf.io.decode_raw(img_bytes, tf.float32), (224, 224, 3)).numpy()
    np.testing.assert_array_equal(decoded, image)
    hm = tf.reshape(tf.io.decode_raw(feats["heatmap"].bytes_list.value[0], tf.float32), (224, 224, 1))
    np.testing.assert_array_equal(hm.numpy()[..., 0], heat)
    assert feats["label"].int64_list.value[:] == [417]


def test_jpeg_encoding_is_rgb_and_gray_jpeg(rng):
    image = rng.integers(0, 256, size=(256, 256, 3)).astype(np.uint8)
    image = np.repeat(np.repeat(image[::8, ::8], 8, 0), 8, 1)  # blocky: JPEG keeps it closely
    heat = np.tile(np.linspace(0, 255, 256, dtype=np.float32), (256, 1))
    feats = _features(records.encode_example(image, heat, 5, records.JPEG))
    img_bytes, hm_bytes = feats["image"].bytes_list.value[0], feats["heatmap"].bytes_list.value[0]
    assert img_bytes[:3] == records.JPEG_MAGIC and hm_bytes[:3] == records.JPEG_MAGIC
    dec_img = tf.io.decode_jpeg(img_bytes).numpy()
    dec_hm = tf.io.decode_jpeg(hm_bytes).numpy()
    assert dec_img.shape == (256, 256, 3) and dec_hm.shape == (256, 256, 1)
    assert np.abs(dec_img.astype(float) - image).mean() < 4.0
    assert np.abs(dec_hm[..., 0].astype(float) - heat).mean() < 2.0


@pytest.mark.parametrize("encoding,size", [(records.JPEG, 256), (records.RAW, 224), (records.RAW, 256)])
def test_describe_and_parse_agree(rng, encoding, size):
    image = rng.uniform(0, 255, size=(size, size, 3)).astype(np.float32)
    heat = rng.uniform(0, 255, size=(size, size)).astype(np.float32)
    serialized = records.encode_example(image, heat, 9, encoding)
    info = records.describe_record(serialized, num_classes=10, decode=True)
    assert info.problem is None and info.encoding == encoding
    assert info.image_shape == (size, size, 3) and info.heatmap_shape == (size, size, 1)
    ex = records.parse_example_tf(tf.constant(serialized), num_classes=10)
    assert int(ex["status"]) == 0 and int(ex["label"]) == 9
    np.testing.assert_array_equal(ex["image"].numpy(), info.image)
    np.testing.assert_array_equal(ex["heatmap"].numpy()[..., 0], info.heatmap)
    assert bool(ex["image_is_jpeg"]) == (encoding == records.JPEG)


def test_detect_encoding():
    assert records.detect_encoding(b"\xff\xd8\xff\xe0" + b"0" * 10, 3) == records.JPEG
    assert records.detect_encoding(b"\0" * (224 * 224 * 12), 3) == records.RAW
    assert records.detect_encoding(b"\0" * (224 * 224 * 4), 1) == records.RAW
    assert records.detect_encoding(b"\0" * (224 * 224 * 4), 3) is None
    assert records.detect_encoding(b"hello", 3) is None
    assert records.raw_side(256 * 256 * 12, 3) == 256


def _bad(image=b"ok", heatmap=b"ok", label=1, drop=()):
    good_img = records.encode_feature(np.zeros((8, 8, 3), np.float32), records.RAW)
    good_hm = records.encode_feature(np.zeros((8, 8, 1), np.float32), records.RAW)
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[good_img if image == b"ok" else image])),
        "heatmap": tf.train.Feature(bytes_list=tf.train.BytesList(value=[good_hm if heatmap == b"ok" else heatmap])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    for k in drop:
        del feature[k]
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


NAN_IMAGE = np.full((8, 8, 3), np.nan, np.float32).tobytes()


@pytest.mark.parametrize("serialized,status,words", [
    (_bad(drop=("image",)), 1, "no 'image'"),
    (_bad(drop=("heatmap",)), 2, "no 'heatmap'"),
    (_bad(drop=("label",)), 3, "no 'label'"),
    (_bad(image=b"not an image at all"), 4, "neither a JPEG"),
    (_bad(heatmap=b"\x00" * 13), 5, "neither a JPEG"),
    (_bad(label=1000), 6, "outside the configured class range"),
    (_bad(label=-1), 6, "outside the configured class range"),
    (_bad(image=NAN_IMAGE), 7, "non-finite"),
    (_bad(heatmap=np.full((8, 8), np.inf, np.float32).tobytes()), 8, "non-finite"),
    (_bad(heatmap=np.zeros((9, 9), np.float32).tobytes()), 9, "does not match"),
])
def test_bad_records_get_a_status_and_a_sentence(serialized, status, words):
    ex = records.parse_example_tf(tf.constant(serialized), num_classes=1000)
    assert int(ex["status"]) == status
    assert np.all(np.isfinite(ex["image"].numpy())) and np.all(np.isfinite(ex["heatmap"].numpy()))
    info = records.describe_record(serialized, num_classes=1000)
    assert info.problem and words in info.problem
    assert status in records.STATUS_MESSAGES


def test_forced_encoding_rejects_the_other(rng):
    serialized = records.encode_example(np.zeros((8, 8, 3)), np.zeros((8, 8)), 0, records.RAW)
    assert int(records.parse_example_tf(tf.constant(serialized), 10, records.JPEG)["status"]) == 10
    assert "configured encoding" in records.describe_record(serialized, 10, records.JPEG).problem
    assert int(records.parse_example_tf(tf.constant(serialized), 10, records.RAW)["status"]) == 0


def test_writer_is_atomic_and_refuses_to_overwrite(tmp_path):
    def boom(i):
        if i == 3:
            raise RuntimeError("interrupted")
        return _bad()

    with pytest.raises(RuntimeError):
        writer.write_shards(str(tmp_path), "train", 2, 6, boom)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    paths = writer.write_shards(str(tmp_path), "train", 2, 5, lambda i: _bad(label=i))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["train-0.tfrecords", "train-1.tfrecords"]
    counts = [sum(1 for _ in tf.data.TFRecordDataset(p)) for p in paths]
    assert counts == [3, 2]  # round-robin
    from advalign_jax.errors import DataError
    with pytest.raises(DataError, match="already exists"):
        writer.write_shards(str(tmp_path), "train", 2, 5, lambda i: _bad())
