"""The adversarial-alignment run: files and columns, resume without duplicates, bad input."""

import csv

import jax
import numpy as np
import pytest

from advalign_jax.cli.main import main
from advalign_jax.config import load_config
from advalign_jax.evaluation import adversarial_alignment as aa
from advalign_jax.models import get_model, save_model
from interrupts import interrupt_on_call


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = get_model("small_cnn", num_classes=10)
    return save_model(str(tmp_path_factory.mktemp("ck") / "cnn"), model, model.init(jax.random.PRNGKey(0)))


def _config(checkpoint, workdir, *extra):
    return load_config("configs/adversarial_alignment.py:runlocal",
                       [f"models=('small_cnn={checkpoint}',)", f"workdir={workdir}", *extra])


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_the_reference_columns(checkpoint, tmp_path):
    summary = aa.evaluate(_config(checkpoint, tmp_path / "w"), progress=False)
    per_image = _read(tmp_path / "w" / "per_image" / "cnn.csv")
    assert list(per_image[0])[:8] == ["model", "img", "label", "pred", "eps", "l2", "linf", "spearman"]
    assert sorted(int(r["img"]) for r in per_image) == list(range(8))
    rows = _read(tmp_path / "w" / "summary.csv")
    assert list(rows[0])[:10] == ["model", "num_correct", "avg_eps", "std_eps", "avg_l2", "std_l2", "avg_linf",
                                  "std_linf", "avg_spearman", "std_spearman"]
    attacked = [r for r in per_image if r["status"] == "attacked"]
    assert int(rows[0]["num_correct"]) == sum(r["status"] != "misclassified" for r in per_image)
    if attacked:
        assert float(rows[0]["avg_l2"]) == pytest.approx(np.mean([float(r["l2"]) for r in attacked]), rel=1e-5)
        assert float(rows[0]["std_eps"]) == pytest.approx(np.std([float(r["eps"]) for r in attacked]), rel=1e-5, abs=1e-9)
    for name in ("tolerance_vs_alignment.png", "config.json"):
        assert (tmp_path / "w" / name).exists()
    assert summary[0]["num_images"] == 8


def test_resume_after_an_interruption(checkpoint, tmp_path, monkeypatch):
    one = ("num_devices=1",)  # batches of 4: two batches for 8 images
    aa.evaluate(_config(checkpoint, tmp_path / "straight", *one), progress=False)
    real = aa.search_batch_fn
    monkeypatch.setattr(aa, "search_batch_fn", interrupt_on_call(real))
    with pytest.raises(KeyboardInterrupt):
        aa.evaluate(_config(checkpoint, tmp_path / "resumed", *one), progress=False)
    assert len(_read(tmp_path / "resumed" / "per_image" / "cnn.csv")) == 4  # the first batch was kept
    with open(tmp_path / "resumed" / "per_image" / "cnn.csv", "a") as f:
        f.write("cnn,5,3,")  # a row cut short by the interruption
    monkeypatch.setattr(aa, "search_batch_fn", real)
    aa.evaluate(_config(checkpoint, tmp_path / "resumed", *one), progress=False)
    a = _read(tmp_path / "straight" / "per_image" / "cnn.csv")
    b = _read(tmp_path / "resumed" / "per_image" / "cnn.csv")
    assert sorted(map(str, a), key=str) == sorted(map(str, b), key=str)  # same rows, none twice
    sa, sb = _read(tmp_path / "straight" / "summary.csv")[0], _read(tmp_path / "resumed" / "summary.csv")[0]
    assert {k: v for k, v in sa.items() if k != "wall_time_s"} == {k: v for k, v in sb.items() if k != "wall_time_s"}


def test_workdir_of_another_configuration_is_refused(checkpoint, tmp_path, capsys):
    aa.evaluate(_config(checkpoint, tmp_path / "w"), progress=False)
    before = (tmp_path / "w" / "per_image" / "cnn.csv").read_text()
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('small_cnn={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}",
                 "--config.attack.steps=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "different configuration (attack.steps: 3 there, 5 now)" in err and err.count("\n") == 0
    assert (tmp_path / "w" / "per_image" / "cnn.csv").read_text() == before


@pytest.mark.parametrize("override,message", [
    ("models=('resnet9000=/nowhere',)", "not a model directory"),
    ("attack.steps=0", "attack.steps must be at least 1"),
    ("search.gate_eps=-1.0", "search.gate_eps (an attack radius) must be positive"),
    ("attack.step_size=0.0", "attack.step_size must be positive"),
    ("models=('bad entry',)", "must look like 'ARCH=CHECKPOINT_DIR'"),
])
def test_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, override, message):
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('small_cnn={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}",
                 f"--config.{override}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.count("\n") == 0, err
    assert not (tmp_path / "w").exists()


def test_checkpoint_of_another_architecture(checkpoint, tmp_path, capsys):
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('mlp2={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds a small_cnn (10 classes), not a mlp2" in err
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('small_cnn={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}",
                 "--config.data.num_classes=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has 10 classes but the data has 5" in err
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------------
# The study's map and input: raw float32 records, correlated against the map as stored
# ----------------------------------------------------------------------------------------------------

def _write_raw_records(path, images, heatmaps, labels):
    """Raw float32 records as the study's file holds them, written with tf.train.Example directly."""
    from advalign_jax.data.tf_env import import_tf

    tf = import_tf()
    with tf.io.TFRecordWriter(str(path)) as w:
        for image, heatmap, label in zip(images, heatmaps, labels):
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.astype("<f4").tobytes()])),
                "heatmap": tf.train.Feature(bytes_list=tf.train.BytesList(value=[heatmap.astype("<f4").tobytes()])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


@pytest.fixture(scope="module")
def raw_records(tmp_path_factory, checkpoint):
    """6 raw float32 64x64 records: smooth images (0..255) and sharp, non-blurred maps, labelled with
    the test checkpoint's predictions (so that every image is attacked)."""
    from advalign_jax.models import load_model

    rng = np.random.default_rng(7)
    n, s = 6, 64
    yy, xx = np.mgrid[:s, :s]
    images = np.stack([np.clip(128 + 100 * np.sin(xx / (5 + i) + yy / 7.0)[..., None] * rng.uniform(0.5, 1, 3)
                               + rng.normal(0, 10, (s, s, 3)), 0, 255) for i in range(n)]).astype(np.float32)
    heatmaps = np.zeros((n, s, s, 1), np.float32)
    for i in range(n):  # a sharp-edged square of clicks plus sparse single clicks
        r, c = rng.integers(8, 40, 2)
        heatmaps[i, r:r + 16, c:c + 16, 0] = rng.uniform(50, 255)
        heatmaps[i, rng.integers(0, s, 30), rng.integers(0, s, 30), 0] = rng.uniform(0, 255, 30)
    model, variables = load_model(checkpoint)
    labels = np.argmax(np.asarray(model.apply(variables, images / np.float32(255.0))), axis=-1)
    path = tmp_path_factory.mktemp("rawrec") / "clickme_test_1000.tfrecords"
    _write_raw_records(path, images, heatmaps, labels)
    return str(path), images, heatmaps[..., 0], labels


def test_the_reader_gives_the_stored_map_unchanged(raw_records):
    from advalign_jax.data.reader import ClickMeReader, ReaderConfig

    path, images, heatmaps, _ = raw_records
    batch = next(iter(ClickMeReader(ReaderConfig(files=(path,), batch_size=6, num_classes=10, image_size=64,
                                                 heatmap_pipeline="as_stored"))))
    np.testing.assert_array_equal(batch["heatmap"], heatmaps)  # bitwise: no resize, no blur
    np.testing.assert_allclose(batch["image"], images / 255.0, rtol=1e-6)
    blurred = next(iter(ClickMeReader(ReaderConfig(files=(path,), batch_size=6, num_classes=10, image_size=64))))
    assert np.max(np.abs(blurred["heatmap"] - heatmaps)) > 10  # the harmonization loader's map differs


def test_evaluate_correlates_against_the_stored_map(checkpoint, raw_records, tmp_path):
    """`advalign-jax evaluate` on raw float32 records: each Spearman equals scipy's between the attack's
    perturbation mask (the attack rerun at the recorded eps) and the map as stored."""
    from scipy.stats import spearmanr

    from advalign_jax.attacks.pgd import pgd
    from advalign_jax.models import load_model

    path, images, heatmaps, _ = raw_records
    args = ["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
            f"--config.models=('small_cnn={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}",
            f"--config.data.files=('{path}',)", "--config.max_images=-1", "--config.num_devices=1"]
    assert main(args) == 0
    rows = [r for r in _read(tmp_path / "w" / "per_image" / "cnn.csv") if r["status"] == "attacked"]
    assert rows, "no image was attacked"
    config = _config(checkpoint, tmp_path / "unused")
    model, variables = load_model(checkpoint)
    x = images / np.float32(255.0)
    checked = 0
    for r in rows:
        i = int(r["img"])
        x_adv, _ = pgd(model.logits_fn(variables), x[i:i + 1], np.array([int(r["label"])]),
                       np.float32(float(r["eps"])), aa.attack_config(config))
        mask = np.abs(np.mean(np.asarray(x_adv)[0] - x[i], axis=-1))
        want = spearmanr(mask.ravel(), heatmaps[i].ravel()).statistic
        assert float(r["spearman"]) == pytest.approx(want, abs=2e-3), (i, r["spearman"], want)
        blurred_map = _harmonization_map(path, i)
        gap = abs(spearmanr(mask.ravel(), blurred_map.ravel()).statistic - want)
        assert gap > 5e-3  # it would differ
        checked += 1
    assert checked == len(rows)


def _harmonization_map(path, i):
    from advalign_jax.data.reader import ClickMeReader, ReaderConfig

    batch = next(iter(ClickMeReader(ReaderConfig(files=(path,), batch_size=6, num_classes=10, image_size=64))))
    return batch["heatmap"][i]


def test_group_minmax_is_the_notebooks_batch_normalisation(rng):
    """The study's notebook: records in batches of 2, ``imgs - imgs.min(); imgs / imgs.max()`` per batch."""
    x = rng.uniform(0.1, 0.9, size=(5, 4, 4, 3)).astype(np.float32)
    x[1] *= 0.2
    index = np.array([6, 7, 8, 9, 10], np.int32)
    mask = np.array([True, True, True, True, False])
    out = np.asarray(aa.group_minmax(x, aa.minmax_groups(index, mask, 2)))
    for pair in ((0, 1), (2, 3)):
        imgs = x[list(pair)].astype(np.float64)
        imgs = imgs - imgs.min()
        np.testing.assert_allclose(out[list(pair)], imgs / imgs.max(), rtol=1e-6, atol=1e-7)
    lone = x[4].astype(np.float64)
    np.testing.assert_allclose(out[4], (lone - lone.min()) / (lone.max() - lone.min()), rtol=1e-6, atol=1e-7)
    per_image = np.asarray(aa.group_minmax(x, aa.minmax_groups(index, mask, 1)))
    assert abs(per_image[1].max() - 1.0) < 1e-6 and out[1].max() < 0.5  # pairs are not per image


def test_reference_domain_refuses_a_split_pair(checkpoint, tmp_path, capsys):
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('small_cnn={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}",
                 "--config.attack_domain=minmax", "--config.data.batch_size=3", "--config.num_devices=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "without the other records of its group of 2" in err and err.count("\n") == 0, err
