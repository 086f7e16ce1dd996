"""``advalign-jax synthesize`` and ``advalign-jax construct`` end to end on the shipped digits models:
files, generation equal to the attack run by hand, the constructed set read back bitwise by the trainer's
loader, a kill and resume, and bad input (one line, nothing written)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax import faults
from advalign_jax.cli.main import main
from advalign_jax.data.images import load_arrays
from advalign_jax.errors import DataError
from advalign_jax.models import get_model, load_model, save_model
from advalign_jax.synthesis import ops

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VANILLA = os.path.join(REPO, "checkpoints", "digits_vanilla")
ROBUST = os.path.join(REPO, "checkpoints", "digits_pgd_l2")


def _synth(work, *extra):
    return ["synthesize", "--config", "configs/synthesize.py:runlocal", "--no-progress", f"--config.workdir={work}",
            f"--config.models=('vanilla={VANILLA}', 'robust={ROBUST}')", f"--config.judge={VANILLA}",
            "--config.generate.classes=(1, 7)", "--config.generate.per_class=2", "--config.generate.steps=6",
            "--config.invert.steps=5", "--config.invert.count=2", "--config.interpolate.steps=3",
            "--config.interpolate.pairs=1", "--config.visualize.steps=3", *extra]


def _construct(work, kind="det", *extra):
    model = ROBUST if kind == "robust" else VANILLA
    return ["construct", "--config", "configs/robust_features.py:runlocal", "--no-progress", f"--config.kind={kind}",
            f"--config.model={model}", f"--config.workdir={work}", "--config.data.limit=40", "--config.attack.steps=5",
            "--config.matching.steps=5", "--config.batch_size=16", *extra]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_synthesize_writes_grids_arrays_and_a_summary(tmp_path, capsys):
    work = tmp_path / "synth"
    assert main(_synth(work)) == 0
    assert "judge_accuracy" in capsys.readouterr().out
    summary = _read(work / "summary.csv")
    assert [(r["model"], r["task"]) for r in summary] == [
        (m, t) for m in ("vanilla", "robust") for t in ("generate", "invert", "interpolate", "visualize")]
    gen = [r for r in summary if r["task"] == "generate"]
    for r in gen:
        assert 0 <= float(r["judge_low"]) <= float(r["judge_accuracy"]) <= float(r["judge_high"]) <= 1
        assert float(r["judge_frechet"]) >= 0
    for r in summary:
        if r["task"] != "generate":
            assert float(r["loss_low"]) <= float(r["loss_mean"]) <= float(r["loss_high"])
    for model in ("vanilla", "robust"):
        for task in ("generate", "invert", "interpolate", "visualize"):
            assert os.path.getsize(work / model / f"{task}.png") > 1000
        with np.load(work / model / "generate.npz") as f:
            assert f["image"].shape == (4, 16, 16, 3) and list(f["cls"]) == [1, 1, 7, 7]
            assert f["image"].min() >= 0 and f["image"].max() <= 1
        with np.load(work / model / "interpolate.npz") as f:
            assert f["image"].shape == (1, 3, 16, 16, 3)
    # A rerun finds everything done and writes the same summary; another recipe is refused.
    before = (work / "summary.csv").read_text()
    files = sorted(p for p in work.rglob("*") if p.is_file() and p.name != ".lock")
    stamps = [p.stat().st_mtime_ns for p in files]
    assert main(_synth(work)) == 0
    assert (work / "summary.csv").read_text() == before
    assert [p.stat().st_mtime_ns for p in files] == stamps  # a finished run reopened rewrites nothing
    capsys.readouterr()
    assert main(_synth(work, "--config.generate.eps=4.0")) == 2
    assert "generate.eps" in capsys.readouterr().err


def test_pooled_and_noise_seeds_carry_no_class(tmp_path):
    """``pooled`` seeds are draws of one Gaussian of every training image (recomputed here from the item
    keys), whatever the class; ``noise`` seeds are ``clamp(randn / 20 + 0.5, 0, 1)``."""
    x, _ = load_arrays("digits", "train")
    pooled = ops.class_gaussians(x, np.zeros(len(x), np.int32), (0,), grain=1)
    for kind in ("pooled", "noise"):
        work = tmp_path / kind
        assert main(_synth(work, "--config.tasks=('generate',)", f"--config.generate.seeds={kind}",
                           "--config.generate.per_class=1")) == 0
        with np.load(work / "vanilla" / "generate.npz") as f:
            seed, cls = f["seed"], f["cls"]
        assert list(cls) == [1, 7]
        keys = [jax.random.fold_in(jax.random.PRNGKey(0), i) for i in range(2)]
        if kind == "pooled":
            want = np.stack([np.asarray(ops.sample_seeds(k, pooled, jnp.zeros(1, jnp.int32))[0]) for k in keys])
        else:
            want = np.stack([np.asarray(ops.noise_seeds(k, (16, 16, 3))) for k in keys])
        np.testing.assert_allclose(seed, want, atol=1e-5)


def test_generation_with_a_fixed_seed_is_the_attack_run_by_hand(tmp_path):
    """The stored seeds, attacked by the project's PGD with the recipe, give the stored images. Three
    steps: the run sharded its batch over the devices and this recomputes it on one, and float32 rounding
    of the two batchings may grow through more normalised steps (the float64 parity is test_ops')."""
    work = tmp_path / "synth"
    assert main(_synth(work, "--config.tasks=('generate',)", "--config.generate.steps=3")) == 0
    model, variables = load_model(ROBUST)
    with np.load(work / "robust" / "generate.npz") as f:
        seed, image, cls = f["seed"], f["image"], f["cls"]
    x, _ = ops.generate(model.logits_fn(variables), jnp.asarray(seed), jnp.asarray(cls),
                        ops.Recipe(eps=8.0, step_size=0.2, steps=3, use_best=True))
    np.testing.assert_allclose(np.asarray(x), image, atol=1e-5)
    assert np.abs(image - seed).max() > 0.01


def test_constructed_set_is_what_the_trainer_reads(tmp_path, capsys):
    work = tmp_path / "det"
    assert main(_construct(work)) == 0
    assert "dataset:" in capsys.readouterr().out
    with np.load(work / "dataset.npz") as f:
        stored = {k: f[k] for k in f.files}
    x, y = load_arrays(f"constructed:{work}", "train")
    np.testing.assert_array_equal(x, stored["image"])  # bitwise
    assert x.dtype == np.float32 and x.shape == (40, 16, 16, 3)
    orig_x, orig_y = load_arrays("digits", "train", None, 40)
    np.testing.assert_array_equal(y, (orig_y + 1) % 10)  # det: relabelled to the next class
    np.testing.assert_array_equal(stored["source_label"], orig_y)
    assert np.sqrt(((x - orig_x) ** 2).sum(axis=(1, 2, 3))).max() <= 1.0 + 1e-4  # within the attack's eps
    test_x, test_y = load_arrays(f"constructed:{work}", "test")  # the original test split
    ref_x, ref_y = load_arrays("digits", "test")
    np.testing.assert_array_equal(test_x, ref_x)
    np.testing.assert_array_equal(test_y, ref_y)
    rows = _read(work / "items.csv")
    assert sorted(int(r["item"]) for r in rows) == list(range(40))
    stamp = (work / "dataset.npz").stat().st_mtime_ns
    assert main(_construct(work)) == 0  # finished: reopened, not rewritten
    assert (work / "dataset.npz").stat().st_mtime_ns == stamp


def test_a_missing_or_damaged_constructed_set_is_one_line(tmp_path, capsys):
    """``constructed:DIR`` without a finished set, or with a damaged ``dataset.npz``: one line naming it,
    from the loader and from ``train``."""
    with pytest.raises(DataError, match="no finished constructed dataset"):
        load_arrays(f"constructed:{tmp_path / 'nothing'}", "train")
    work = tmp_path / "det"
    assert main(_construct(work)) == 0
    (work / "dataset.npz").write_bytes(b"not an npz")
    with pytest.raises(DataError, match="not a readable constructed dataset"):
        load_arrays(f"constructed:{work}", "train")
    capsys.readouterr()
    assert main(["train", "--config", "configs/adversarial_digits.py:vanilla", "--no-progress",
                 f"--config.arrays.source=constructed:{work}", f"--config.workdir={tmp_path / 'train'}",
                 "--config.total_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset.npz" in err and len(err.splitlines()) == 1, err


def test_robust_set_keeps_labels_and_starts_from_another_image(tmp_path):
    work = tmp_path / "robust"
    assert main(_construct(work, "robust")) == 0
    with np.load(work / "dataset.npz") as f:
        label, source, seeds = f["label"], f["source_label"], f["seed_index"]
    np.testing.assert_array_equal(label, source)
    assert (seeds != np.arange(40)).all()
    losses = [float(r["loss"]) for r in _read(work / "items.csv")]
    assert 0 < np.mean(losses) < 1


def test_killed_construct_resumes_to_the_same_dataset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", faults.ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    cli = [sys.executable, "-m", "advalign_jax.cli.main"]
    work = tmp_path / "killed"
    killed = subprocess.run(cli + _construct(work), cwd=REPO, env=dict(env, **{faults.ENV: f"{faults.ROWS_APPENDED}:1"}),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert 0 < len(_read(work / "items.csv")) < 40 and not (work / "dataset.npz").exists()
    resumed = subprocess.run(cli + _construct(work, "det", "--config.batch_size=8"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "straight"
    assert subprocess.run(cli + _construct(straight), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300).returncode == 0
    with np.load(work / "dataset.npz") as a, np.load(straight / "dataset.npz") as b:
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["image"], b["image"], atol=1e-5)  # other batch sizes: float32 rounding


def _five_class_model(path):
    model = get_model("small_cnn", num_classes=5, widths=(8, 16), patch=4, input_size=16)
    return save_model(str(path), model, model.init(np.zeros(2, np.uint32)))


@pytest.mark.parametrize("extra, message", [
    (("--config.generate.classes=(12,)",), "class 12"),
    (("--config.layer=nope",), "layer='nope'"),
    (("--config.generate.eps=0",), "eps must be positive"),
    (("--config.invert.steps=0",), "steps must be at least 1"),
    (("--config.tasks=('dream',)",), "unknown task"),
    (("--config.generate.seeds=dreams",), "generate.seeds must be one of"),
])
def test_synthesize_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    work = tmp_path / "bad"
    assert main(_synth(work, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not work.exists()


def test_construct_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    five = _five_class_model(tmp_path / "five")
    cases = [(("--config.kind=both",), "kind must be one of"),
             ((f"--config.model={five}",), "5 classes"),
             (("--config.attack.eps=-1",), "eps must be positive"),
             (("--config.attack.steps=0",), "steps must be at least 1")]
    for extra, message in cases:
        work = tmp_path / "bad"
        assert main(_construct(work, "det", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (extra, err)
        assert not work.exists()
    work = tmp_path / "bad"
    assert main(_synth(work, f"--config.models=('five={five}',)")) == 2  # synthesize checks the classes too
    err = capsys.readouterr().err.strip()
    assert "5 classes" in err and len(err.splitlines()) == 1 and not work.exists(), err
    in_the_way = tmp_path / "file"
    in_the_way.write_text("not a directory")
    assert main(_construct(in_the_way)) == 2
    err = capsys.readouterr().err.strip()
    assert "file" in err and len(err.splitlines()) == 1, err
    assert in_the_way.read_text() == "not a directory"


def test_construct_sharded_over_eight_devices_equals_one_device(tmp_path):
    """The same set from a mesh of every (simulated) device and from one device."""
    if jax.device_count() < 2:
        pytest.skip("one device: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    one, many = tmp_path / "one", tmp_path / "many"
    assert main(_construct(one, "non_robust", "--config.num_devices=1")) == 0
    assert main(_construct(many, "non_robust", "--config.num_devices=0", "--config.batch_size=24")) == 0
    with np.load(one / "dataset.npz") as a, np.load(many / "dataset.npz") as b:
        np.testing.assert_array_equal(a["seed_index"], b["seed_index"])
        np.testing.assert_allclose(a["image"], b["image"], atol=1e-5)
