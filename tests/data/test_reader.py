"""The ClickMe reader: eval completeness and padding, process sharding, training determinism, mixing."""

import numpy as np
import pytest

import reference_harmonization as ref
from advalign_jax.data import reader as reader_lib
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import ConfigError, DataError

tf = import_tf()


def _reader(files, p=0, n=1, **kw):
    kw.setdefault("num_classes", 10)
    cfg = reader_lib.ReaderConfig(files=tuple(files), **kw)
    return reader_lib.ClickMeReader(cfg, process_index=p, process_count=n)


def _collect(reader):
    batches = list(reader)
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return batches, out


def test_eval_reads_every_record_once_and_matches_reference(jpeg_shards):
    r = _reader(jpeg_shards, batch_size=8, image_range="0_255")
    batches, out = _collect(r)
    assert len(batches) == r.num_batches == 3  # 20 records -> 8 + 8 + 4 (padded)
    assert all(b["image"].shape == (8, 224, 224, 3) and b["heatmap"].shape == (8, 224, 224) for b in batches)
    assert out["mask"].sum() == 20 and not batches[-1]["mask"][4:].any()
    idx = out["index"][out["mask"]]
    assert sorted(idx) == list(range(20))
    # Record order: files sorted by name, records in file order; shard i holds records i, i+3, ...
    parse = ref.load("common.clickme_dataset").parse_clickme_prototype
    raws = [raw for p in jpeg_shards for raw in tf.data.TFRecordDataset(p).as_numpy_iterator()]
    for k in np.flatnonzero(out["mask"])[:6]:
        image, heat, label = parse(raws[out["index"][k]])
        np.testing.assert_allclose(out["image"][k], image.numpy(), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(out["heatmap"][k], heat.numpy()[..., 0], rtol=1e-5, atol=1e-3)
        assert out["label"][k] == int(np.argmax(label))
    assert np.all(out["token"][out["mask"]] == 1.0)
    assert np.all(out["image"][~out["mask"]] == 0)


def test_eval_unit_range_and_raw_encoding(raw_shard):
    r = _reader(raw_shard, batch_size=4)
    batches, out = _collect(r)
    assert len(batches) == 2 and out["mask"].sum() == 6
    imgs = out["image"][out["mask"]]
    assert 0.0 <= imgs.min() and imgs.max() <= 1.0 and imgs.max() > 0.5
    assert out["heatmap"][out["mask"]].max() > 10  # eval maps are not normalised (reference)


@pytest.mark.parametrize("num_processes", [2, 3, 5])
def test_process_sharding_reads_each_record_once_with_equal_batches(small_shards, num_processes):
    seen, lengths = [], []
    for p in range(num_processes):
        batches, out = _collect(_reader(small_shards, p, num_processes, batch_size=4, image_size=32))
        lengths.append(len(batches))
        seen.extend(out["index"][out["mask"]].tolist())
    assert sorted(seen) == list(range(26))  # every record exactly once over all processes
    assert len(set(lengths)) == 1  # every process yields the same number of batches


def test_record_sharding_when_fewer_files_than_processes(raw_shard):
    seen, lengths = [], []
    for p in range(4):
        r = _reader(raw_shard, p, 4, batch_size=1)
        assert r.record_sharded
        batches, out = _collect(r)
        lengths.append(len(batches))
        seen.extend(out["index"][out["mask"]].tolist())
    assert sorted(seen) == list(range(6)) and set(lengths) == {2}


def test_train_is_deterministic_for_a_seed_and_shuffles(small_shards):
    kw = dict(batch_size=5, mode="train", image_size=32, shuffle_buffer=16)
    a = list(_reader(small_shards, seed=3, **kw).take(4))
    b = list(_reader(small_shards, seed=3, **kw).take(4))
    c = list(_reader(small_shards, seed=4, **kw).take(4))
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
    assert set(a[0]) == {"image", "heatmap", "label", "token"}
    heat = np.concatenate([x["heatmap"] for x in a])
    assert heat.min() >= 0 and heat.max() <= 1.0 and heat.max() > 0.9  # min-max maps
    # 20 draws from an endless, shuffled stream over several epochs: most classes appear.
    assert len(set(np.concatenate([x["label"] for x in a]).tolist())) >= 8


def test_train_mixing_with_a_mapless_tfds_source(small_shards, tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        r = _reader(small_shards, batch_size=16, mode="train", image_size=32, clickme_weight=0.25,
                    mix_sources=("tfds:cifar10:train",), mix_weights=(0.75,), seed=0)
        batches = list(r.take(8))
    token = np.concatenate([b["token"] for b in batches])
    heat = np.concatenate([b["heatmap"] for b in batches])
    assert 0.1 < token.mean() < 0.45  # about a quarter from ClickMe
    assert np.all(heat[token == 0] == 0)  # map-less images: zero map, token 0
    peak = heat[token == 1].max(axis=(1, 2))
    assert np.all((peak > 0.99) | (peak == 0))  # min-max maps (all zero only where the crop missed the object)
    assert np.mean(peak > 0.99) > 0.8
    assert np.all(np.isfinite(heat))
    assert np.concatenate([b["image"] for b in batches]).shape[1:] == (32, 32, 3)


def test_mixing_weights_must_sum_to_one(small_shards):
    with pytest.raises(ConfigError, match="sum to 1"):
        reader_lib.ReaderConfig(files=tuple(small_shards), batch_size=4, mode="train", clickme_weight=0.2,
                                mix_sources=("tfds:imagenet2012",), mix_weights=(0.7,))
    with pytest.raises(ConfigError, match="mode='train'"):
        reader_lib.ReaderConfig(files=tuple(small_shards), batch_size=4, clickme_weight=0.2,
                                mix_sources=("tfds:imagenet2012",), mix_weights=(0.8,))


def test_missing_tfds_dataset_says_how_to_prepare_it(small_shards, tmp_path):
    from advalign_jax.errors import DataError

    r = _reader(small_shards, batch_size=4, mode="train", clickme_weight=0.5,
                mix_sources=("tfds:cifar10",), mix_weights=(0.5,), tfds_data_dir=str(tmp_path))
    with pytest.raises(DataError, match="tfds build cifar10"):
        next(iter(r))


def test_all_zero_heatmaps_give_no_nan(tmp_path):
    from advalign_jax.data import records, writer

    img = np.full((64, 64, 3), 128.0, np.float32)
    paths = writer.write_shards(str(tmp_path), "zero", 1, 4,
                                lambda i: records.encode_example(img, np.zeros((64, 64)), i, records.JPEG))
    for mode in ("eval", "train"):
        r = _reader(paths, batch_size=4, mode=mode, image_size=32)
        batch = next(iter(r))
        assert np.all(batch["heatmap"] == 0) and np.all(np.isfinite(batch["image"]))


def test_global_batches_same_on_one_and_eight_devices(small_shards):
    import jax

    from advalign_jax import parallel

    assert len(jax.devices()) == 8
    host = list(_reader(small_shards, batch_size=8, image_size=32))
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices=devices)
        got = list(_reader(small_shards, batch_size=8, image_size=32).global_batches(mesh))
        assert len(got) == len(host)
        for g, h in zip(got, host):
            assert g["image"].sharding.mesh.size == len(devices)
            for k in h:
                np.testing.assert_array_equal(np.asarray(g[k]), h[k])


@pytest.mark.parametrize("num_processes", [2, 3])
@pytest.mark.parametrize("mixed", [False, True])
def test_global_train_stream_does_not_depend_on_the_process_count(small_shards, num_processes, mixed):
    """process_sharding='global': the processes' blocks of each batch, side by side, are the batch one
    process reads (bitwise), with and without a mixed-in map-less source."""
    import tensorflow_datasets as tfds

    kw = dict(mode="train", image_size=32, shuffle_buffer=16, seed=5)
    if mixed:
        kw.update(clickme_weight=0.5, mix_sources=("tfds:cifar10:train",), mix_weights=(0.5,))
    b = 2
    with tfds.testing.mock_data(num_examples=40):
        single = list(_reader(small_shards, batch_size=b * num_processes, **kw).take(5))
        parts = [list(_reader(small_shards, p, num_processes, batch_size=b, **kw).take(5))
                 for p in range(num_processes)]
    for i, whole in enumerate(single):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([parts[p][i][key] for p in range(num_processes)]),
                                          whole[key], err_msg=f"batch {i} {key}")
    if mixed:
        assert 0 < np.mean(np.concatenate([s["token"] for s in single])) < 1


def test_files_train_stream_gives_each_process_its_own_files(small_shards):
    kw = dict(mode="train", image_size=32, shuffle_buffer=16, seed=5, process_sharding="files", batch_size=2)
    a = list(_reader(small_shards, 0, 2, **kw).take(3))
    b = list(_reader(small_shards, 1, 2, **kw).take(3))
    assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_a_training_stream_of_a_mapless_source_alone_needs_no_clickme_files():
    """clickme_weight 0 and no files: the training stream is the TFDS source alone (plain ImageNet for
    adversarial training): zero maps, token 0, the source's labels."""
    import tensorflow_datasets as tfds

    cfg = reader_lib.ReaderConfig(files=(), batch_size=8, mode="train", num_classes=10, image_size=32, clickme_weight=0.0,
                       mix_sources=("tfds:cifar10:train",), mix_weights=(1.0,), seed=0, shuffle_buffer=16)
    with tfds.testing.mock_data(num_examples=40):
        batches = list(reader_lib.ClickMeReader(cfg).take(3))
    assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)
    assert all(np.all(b["token"] == 0) and np.all(b["heatmap"] == 0) for b in batches)
    assert all(np.all((b["label"] >= 0) & (b["label"] < 10)) for b in batches)
    with pytest.raises(DataError, match="data.files is empty"):
        reader_lib.ClickMeReader(reader_lib.ReaderConfig(files=(), batch_size=8, mode="eval", num_classes=10))
