"""PAG on the shared trainer: the toy 2-D experiment's result over seeds, exact resume, 1 vs 8 devices,
precomputed targets (the `targets` command's .npz and TFRecord shards) and bad input."""

import os

import jax
import numpy as np
import pytest

from advalign_jax.cli.main import main
from advalign_jax.config import load_config
from advalign_jax.errors import AdvalignError, DataError
from advalign_jax.data import target_files as F
from advalign_jax.models import load_model
from advalign_jax.training.seed_sweep import sweep
from advalign_jax.training.trainer import train

QUIET = dict(progress=False, log=lambda *a: None)


def _leaves(path):
    return jax.tree.leaves(load_model(str(path))[1])


def test_toy2d_pag_keeps_its_points_where_vanilla_loses_them(tmp_path):
    """The toy experiment (configs/pag_toy2d.py, the full 100 epochs) over 12 seeds per model, each
    model's seeds trained in one compiled program (advalign_jax/training/seed_sweep.py; seed s is the
    computation of ``train`` with seed=s, tests/training/test_seed_sweep.py). One seed's count is a chaotic draw
    (256 seeds give PAG 108-600 and vanilla 0-510 kept of 600), so the assertions are on medians, with
    margins measured over 256 seeds: the median of 12 over 21 disjoint groups ranged over PAG 425-578.5
    and vanilla 1.5-112; resampled, a PAG median below 350 or a vanilla median above 250 has probability
    about 1e-5. docs/pag.md has the distributions."""
    seeds = list(range(12))
    result = {}
    for variant in ("vanilla", "pag"):
        config = load_config(f"configs/pag_toy2d.py:{variant}", [f"workdir={tmp_path / variant}"])
        result[variant] = sweep(config, seeds)
    vanilla, pag = result["vanilla"], result["pag"]
    assert vanilla["n"] == pag["n"] == 600
    assert all(vanilla["finite"]) and all(pag["finite"])
    # both fit the modes (a PAG seed may leave one of the six modes unfitted: 500 of 600)
    assert np.median(vanilla["clean_correct"]) >= 590 and np.median(pag["clean_correct"]) >= 500
    # the paper's count (attacked prediction = label) and the evaluator's (also correct clean)
    for r in (vanilla, pag):
        assert np.all(r["kept_robust"] <= r["kept_adversarial"])
    assert np.median(vanilla["kept_adversarial"]) <= 250
    assert np.median(pag["kept_adversarial"]) >= 350
    assert np.median(pag["kept_robust"]) >= 350


def _digits(tmp_path, name, *overrides):
    return load_config("configs/pag_digits.py:runlocal", [f"workdir={tmp_path / name}", *overrides])


def test_pag_exact_resume(tmp_path):
    train(_digits(tmp_path, "a"), **QUIET)
    config = _digits(tmp_path, "b")
    train(config, stop_after=4, **QUIET)  # checkpoint at 3, interrupted at 4
    train(config, **QUIET)
    for u, v in zip(_leaves(tmp_path / "a" / "model"), _leaves(tmp_path / "b" / "model")):
        np.testing.assert_array_equal(u, v)


def test_pag_one_and_eight_devices_agree(tmp_path):
    finals = []
    for n in (1, 8):
        config = _digits(tmp_path, f"d{n}", f"num_devices={n}", "total_steps=2", "optimizer.name=sgd")
        train(config, **QUIET)
        finals.append(_leaves(tmp_path / f"d{n}" / "model"))
    for u, v in zip(*finals):
        np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("source", ["one_image", "class_mean"])
def test_representative_targets_train(tmp_path, source):
    config = _digits(tmp_path, source, f"objective.target_source={source}", "total_steps=2")
    result = train(config, **QUIET)
    assert np.isfinite(result["loss"]) and 0 <= result["eval_robust_accuracy"] <= result["eval_accuracy"]


@pytest.mark.parametrize("shards", [0, 3])
def test_precomputed_targets_from_the_targets_command(tmp_path, shards, capsys):
    out = str(tmp_path / ("t.npz" if not shards else "t"))
    args = ["targets", "--source", "digits", "--limit", "200", "--method", "nearest_neighbour", "--out", out,
            "--no-progress"] + (["--shards", str(shards)] if shards else [])
    assert main(args) == 0
    pattern = out if not shards else os.path.join(out, "targets-*.tfrecords")
    loaded = F.load_targets(out) if not shards else F.read_target_records(sorted(
        os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tfrecords")))
    assert loaded.targets.shape == (200, 10, 16, 16, 3)
    # The stored targets are the brute-force nearest other image of each class, minus the image.
    x, y = loaded.images, loaded.labels
    flat = x.reshape(len(x), -1)
    d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    for i in (0, 57, 199):
        for c in range(10):
            members = np.flatnonzero(y == c)
            j = members[np.argmin(d[i, members])]
            np.testing.assert_allclose(loaded.targets[i, c], x[j] - x[i], atol=1e-6)
    config = _digits(tmp_path, f"pre{shards}", "objective.target_source=precomputed", f"objective.targets_file={pattern}",
                     "total_steps=2")
    assert np.isfinite(train(config, **QUIET)["loss"])


def test_targets_for_another_dataset_are_refused(tmp_path):
    out = str(tmp_path / "t300.npz")
    assert main(["targets", "--source", "digits", "--limit", "300", "--method", "class_mean", "--out", out,
                 "--no-progress"]) == 0
    config = _digits(tmp_path, "bad", "objective.target_source=precomputed", f"objective.targets_file={out}")
    with pytest.raises(DataError, match="targets for 300 images .* training split has 200"):
        train(config, **QUIET)
    config = _digits(tmp_path, "bad2", "objective.target_source=precomputed", "objective.targets_file=nope.npz")
    with pytest.raises(DataError, match="nope.npz: no such file"):
        train(config, **QUIET)


def test_non_finite_targets_are_named(tmp_path):
    x = np.random.default_rng(0).random((4, 16, 16, 3)).astype(np.float32)
    t = np.zeros((4, 10, 16, 16, 3), np.float32)
    t[2, 7, 3, 3, 1] = np.nan
    path = F.save_targets(str(tmp_path / "nan.npz"), x, t)
    with pytest.raises(DataError, match=r"image 2.*class 7"):
        F.load_targets(path)


def test_pag_on_clickme_data_is_refused_clearly(tmp_path, small_shards):
    config = load_config("configs/demo.py:runlocal", [f"workdir={tmp_path / 'c'}", "objective.name=pag",
                                                      f"data.files=('{os.path.dirname(small_shards[0])}/*.tfrecords',)"])
    with pytest.raises(AdvalignError, match="data_kind='arrays'"):
        train(config, **QUIET)


@pytest.mark.parametrize("recipe", ["configs/pag_cifar10_resnet18.py:runlocal", "configs/pag_cifar10_vit.py:runlocal"])
def test_official_pag_recipes_run_locally(recipe, tmp_path):
    config = load_config(recipe, [f"workdir={tmp_path / 'r'}"])
    # the recipe's wiring (objective, targets, optimizer, schedule) on narrow copies of the two networks: the
    # double backprop of the full-width ones, replicated on 8 simulated devices, took 150 s here
    small = {"cifar_resnet18": dict(widths=(8, 16, 32, 64)), "cifar_vit": dict(hidden=48, num_layers=2, heads=4,
                                                                               mlp_hidden=48)}
    with config.unlocked():
        config.model.options.update(small[config.model.name])
    assert config.optimizer.name == "sgd" and config.optimizer.weight_decay == 1e-4 and config.seed == 3407
    result = train(config, **QUIET)
    assert np.isfinite(result["loss"]) and os.path.exists(result["export"])


def test_array_batches_of_several_processes_side_by_side_are_one_process_batches():
    from advalign_jax.training.inputs import ArrayBatches

    x = np.arange(50, dtype=np.float32).reshape(50, 1)
    y = np.arange(50) % 3
    one = ArrayBatches(x, y, 12, seed=4)
    parts = [ArrayBatches(x, y, 4, seed=4, process_index=p, process_count=3) for p in range(3)]
    for _ in range(9):  # across epoch boundaries (48 usable examples: 4 global batches per epoch)
        whole = next(one)
        pieces = [next(p) for p in parts]
        np.testing.assert_array_equal(np.concatenate([b["index"] for b in pieces]), whole["index"])
