"""The official PAG code's behaviour next to ours (configs/pag_cifar10_*.py): the learning-rate table,
the variants' settings, training with the official semantics, and precomputed targets read as the
official code reads them (the file's own images and labels) or checked image by image against the
training split. The official step itself (two passes, one crop and flip per batch and pass) is checked
against PyTorch in tests/losses/test_pag_loss.py."""

import numpy as np
import pytest

from advalign_jax.config import load_config
from advalign_jax.data.images import load_arrays
from advalign_jax.errors import ConfigError, DataError
from advalign_jax.data import target_files as F
from advalign_jax.training import inputs, optim
from advalign_jax.training.trainer import train

QUIET = dict(progress=False, log=lambda *a: None)

# royg27/PAG-ROB TRAIN_CIFAR10.py, adjust_learning_rate with lr 0.01 and 100 epochs, for the 1-indexed
# epochs 1..100 it is called with: 0.01 until epoch 49, 0.001 from 50, 0.0001 from 75, 0.00001 at 100.
OFFICIAL_RATES = [0.01] * 49 + [0.001] * 25 + [0.0001] * 25 + [0.00001]
# ours (the PAG paper's recipe: x0.1 at epoch 50, x0.01 at 75, x0.001 at 100, 100 epochs; from 0)
OUR_RATES = [0.01] * 50 + [0.001] * 25 + [0.0001] * 25


@pytest.mark.parametrize("arch", ["resnet18", "vit"])
@pytest.mark.parametrize("variant,table", [("nn", OUR_RATES), ("nn_official", OFFICIAL_RATES),
                                           ("official", OFFICIAL_RATES)])
def test_learning_rate_at_every_epoch(arch, variant, table):
    c = load_config(f"configs/pag_cifar10_{arch}.py:{variant}")
    assert c.steps_per_epoch == 781 and c.total_steps == 100 * 781
    lr = optim.schedule(c.schedule, c.steps_per_epoch, c.total_steps)
    rates = optim.epoch_learning_rates(lr, c.steps_per_epoch, 100)
    for epoch, ((first, last), want) in enumerate(zip(rates, table), start=1):
        assert first == pytest.approx(want, rel=1e-6) and last == pytest.approx(want, rel=1e-6), epoch
    assert optim.official_pag_boundaries(100) == (49.0, 74.0, 99.0)
    assert optim.official_pag_boundaries(10) == (4.0, 7.0, 9.0)  # 1-indexed 5 (>= 5), 8 (>= 7.5), 10


def test_variants():
    ours = load_config("configs/pag_cifar10_resnet18.py:sbg")
    official = load_config("configs/pag_cifar10_resnet18.py:official")
    assert (ours.objective.semantics, ours.objective.per_example_augment, ours.objective.targets_images) == \
        ("shared", True, "verify")
    o = official.objective
    assert (o.semantics, o.per_example_augment, o.targets_images, o.targets_image_range) == \
        ("replicated", False, "file", "-1_1")
    assert (o.target_source, o.targets_file, o.targets_labels_file) == \
        ("precomputed", "data/c10_sbg_data.pt", "data/c10_sbg_label.pt")
    assert load_config("configs/pag_cifar10_resnet18.py:nn_official").objective.target_source == "nearest_neighbour"
    vit = load_config("configs/pag_cifar10_vit.py:official")
    assert vit.objective.warm_steps == 50 * 781 and vit.objective.warm_weight == 20.0  # 1-indexed epochs 1-50
    for shared in ("optimizer", "eval_attack"):
        assert ours[shared].to_dict() == official[shared].to_dict()
    with pytest.raises(ConfigError):
        load_config("configs/pag_cifar10_resnet18.py:xx_official")


def test_official_semantics_train(tmp_path):
    """The official semantics through the trainer (two passes, per-batch crops): the wiring, on digits."""
    config = load_config("configs/pag_digits.py:runlocal", [f"workdir={tmp_path / 'w'}", "total_steps=2",
                                                            "objective.semantics=replicated",
                                                            "objective.per_example_augment=false",
                                                            "objective.augment_padding=2"])
    result = train(config, **QUIET)
    assert np.isfinite(result["loss"])


# ---------------------------------------------------------------------------------------------------
# Precomputed targets: whose images?
# ---------------------------------------------------------------------------------------------------


def _digits(tmp_path, name, *overrides):
    return load_config("configs/pag_digits.py:runlocal", [f"workdir={tmp_path / name}",
                                                          "objective.target_source=precomputed", *overrides])


def _split():
    return load_arrays("digits", "train", None, 200)


def _targets(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 10, 16, 16, 3)).astype(np.float32)


def test_a_file_of_the_same_images_is_accepted(tmp_path):
    x, y = _split()
    t = _targets(len(x))
    path = F.save_targets(str(tmp_path / "same.npz"), x, t, y)
    stream = inputs.make("arrays", _digits(tmp_path, "a", f"objective.targets_file={path}"), 16)
    batch = next(stream)
    np.testing.assert_array_equal(batch["image"], x[batch["index"]])
    np.testing.assert_array_equal(batch["targets"], t[batch["index"]])
    # the same images stored in [-1, 1] (the official frame), declared as such
    path = F.save_targets(str(tmp_path / "pm1.npy"), 2 * x - 1, t)
    inputs.make("arrays", _digits(tmp_path, "b", f"objective.targets_file={path}",
                                  "objective.targets_image_range=-1_1"), 16)
    with pytest.raises(DataError, match=r"pm1.npy: image 0 is not image 0 of the training split"):
        inputs.make("arrays", _digits(tmp_path, "c", f"objective.targets_file={path}"), 16)


def test_a_file_of_other_images_is_refused_by_index(tmp_path):
    x, y = _split()
    t = _targets(len(x))
    order = np.arange(len(x))
    order[[57, 58]] = [58, 57]  # the same images, two of them in the other order
    path = F.save_targets(str(tmp_path / "swapped.npz"), x[order], t[order])
    with pytest.raises(DataError, match=r"^\S*swapped.npz: image 57 is not image 57 of the training split"):
        inputs.make("arrays", _digits(tmp_path, "s", f"objective.targets_file={path}"), 16)
    labels = y.copy()
    labels[3] = (labels[3] + 1) % 10
    path = F.save_targets(str(tmp_path / "relabelled.npz"), x, t, labels)
    with pytest.raises(DataError, match=rf"relabelled.npz: image 3 is labelled {labels[3]}, but the training split "
                                        rf"labels it {y[3]}"):
        inputs.make("arrays", _digits(tmp_path, "l", f"objective.targets_file={path}"), 16)
    x2 = x.copy()
    x2[120, 3, 4, 1] += 1 / 255  # one grey level, one pixel
    path = F.save_targets(str(tmp_path / "pixel.npz"), x2, t)
    with pytest.raises(DataError, match=r"image 120 is not image 120"):
        inputs.make("arrays", _digits(tmp_path, "p", f"objective.targets_file={path}"), 16)


def test_training_on_the_files_own_images_and_labels(tmp_path):
    """objective.targets_images='file': the official code's data (the file's images, in [-1, 1], and a
    separate label file), not the configured training split."""
    x, y = load_arrays("digits", "test", None, 64)  # images the training split does not hold
    t = _targets(len(x), seed=1)
    data = str(tmp_path / "sbg.npy")
    F.save_targets(data, 2 * x - 1, t, layout="nchw")
    labels = str(tmp_path / "labels.npy")
    np.save(labels, y.astype(np.int64))
    overrides = [f"objective.targets_file={data}", "objective.targets_images=file",
                 "objective.targets_image_range=-1_1", "arrays.limit=0"]
    config = _digits(tmp_path, "f", *overrides, f"objective.targets_labels_file={labels}", "total_steps=2")
    stream = inputs.make("arrays", config, 16)
    assert len(stream.images) == 64
    np.testing.assert_allclose(stream.images, x, atol=1e-6)
    np.testing.assert_array_equal(stream.labels, y)
    batch = next(stream)
    np.testing.assert_array_equal(batch["targets"], t[batch["index"]])
    assert np.isfinite(train(config, **QUIET)["loss"])
    with pytest.raises(ConfigError, match="holds no labels"):
        inputs.make("arrays", _digits(tmp_path, "n", *overrides), 16)
    np.save(labels, y[:10])
    with pytest.raises(DataError, match="10 labels for the 64 images"):
        inputs.make("arrays", _digits(tmp_path, "m", *overrides, f"objective.targets_labels_file={labels}"), 16)
    with pytest.raises(ConfigError, match="targets_images"):
        inputs.make("arrays", _digits(tmp_path, "o", f"objective.targets_file={data}",
                                      "objective.targets_images=x"), 16)


def test_first_differing_image():
    a = np.zeros((5, 2, 2), np.float32)
    b = a.copy()
    assert F.first_differing_image(a, b) is None
    b[3, 1, 0] = 2e-5
    b[4, 0, 0] = np.nan
    assert F.first_differing_image(a, b, chunk=2) == (3, pytest.approx(2e-5))
    b[3] = 0
    i, d = F.first_differing_image(a, b)
    assert i == 4 and np.isnan(d)
