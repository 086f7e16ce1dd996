"""The trainer: end to end, exact resume, 1 vs 8 devices, divergence, and refusing a wrong resume."""

import os

import jax
import numpy as np
import pytest

from advalign_jax.config import load_config
from advalign_jax.errors import AdvalignError
from advalign_jax.models import load_model
from advalign_jax.training.trainer import TrainingDiverged, train


def _config(small_shards, workdir, *overrides):
    return load_config("configs/demo.py:runlocal", [f"data.files=('{os.path.dirname(small_shards[0])}/*.tfrecords',)",
                                                     "eval_data.files=()", f"workdir={workdir}",
                                                     "data.image_size=32", *overrides])


def _params(path):
    _, variables = load_model(path)
    return variables


def test_train_export_and_exact_resume(small_shards, tmp_path):
    straight = _config(small_shards, tmp_path / "a")
    result = train(straight, progress=False, log=lambda *a: None)
    assert np.isfinite(result["loss"]) and result["export"] == os.path.join(str(tmp_path / "a"), "model")
    model, variables = load_model(result["export"])
    assert model.name == "small_cnn" and "batch_stats" in variables
    rows = open(tmp_path / "a" / "metrics.csv").read().splitlines()
    assert rows[0].startswith("step,") and "learning_rate" in rows[0] and len(rows) >= 4
    assert os.listdir(tmp_path / "a" / "tensorboard")

    interrupted = _config(small_shards, tmp_path / "b")
    train(interrupted, progress=False, stop_after=4, log=lambda *a: None)  # checkpoint at 3, stop at 4
    assert not os.path.exists(tmp_path / "b" / "model")
    train(interrupted, progress=False, log=lambda *a: None)  # resumes
    a, b = _params(tmp_path / "a" / "model"), _params(tmp_path / "b" / "model")
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)  # bitwise

    def steps(run):
        return [int(r.split(",")[0]) for r in open(tmp_path / run / "metrics.csv").read().splitlines()[1:]]
    assert steps("b") == steps("a")  # the resumed log has the same rows, none twice


def test_one_and_eight_devices_agree(small_shards, tmp_path):
    finals = []
    for n in (1, 8):
        config = _config(small_shards, tmp_path / f"d{n}", f"num_devices={n}", "total_steps=2",
                         "optimizer.name=sgd")  # Adam's g/sqrt(v) turns float noise on near-zero gradients into +-lr
        train(config, progress=False, log=lambda *a: None)
        finals.append(_params(tmp_path / f"d{n}" / "model"))
    for u, v in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
        np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5)


def test_divergence_stops_with_a_clear_message(small_shards, tmp_path):
    config = _config(small_shards, tmp_path / "nan", "schedule.base_lr=1e30", "optimizer.name=sgd",
                     "total_steps=8", "log_every=1", "checkpoint_every=100")
    with pytest.raises(TrainingDiverged, match="(the loss|the gradient) became .* at step"):
        train(config, progress=False, log=lambda *a: None)


def test_resume_from_another_optimizer_is_refused(small_shards, tmp_path):
    train(_config(small_shards, tmp_path / "r", "total_steps=3"), progress=False, log=lambda *a: None)
    with pytest.raises(AdvalignError, match="optimizer 'adamw'.*'sgd'"):
        train(_config(small_shards, tmp_path / "r", "total_steps=6", "optimizer.name=sgd"), progress=False,
              log=lambda *a: None)


def test_harmonizer_step_on_one_and_eight_devices(small_shards, tmp_path):
    """One harmonizer step (double backprop, BatchNorm in training mode) gives the same parameters."""
    finals = []
    for n in (1, 8):
        config = _config(small_shards, tmp_path / f"h{n}", f"num_devices={n}", "total_steps=1",
                         "objective.name=harmonizer", "log_every=1")
        result = train(config, progress=False, log=lambda *a: None)
        assert np.isfinite(result["alignment"])
        finals.append(_params(tmp_path / f"h{n}" / "model"))
    for u, v in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
        np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("recipe", ["configs/harmonize_vit_b16.py:runlocal"])
def test_harmonization_recipe_runs_locally(recipe, tmp_path):
    # The recipe's wiring (objective, optimizer, schedule, data) on a ViT of 2 narrow blocks: the suite's 8
    # simulated devices each hold a replica of the parameters, and ViT-B/16's 86M of them with their gradients
    # and momentum took 17 GB there (3 GB on one device).
    config = load_config(recipe, [f"workdir={tmp_path / 'r'}"])
    with config.unlocked():
        config.model.options.update(depth=2, width=192, heads=3, mlp_dim=768)
    result = train(config, progress=False, log=lambda *a: None)
    assert np.isfinite(result["loss"]) and os.path.exists(result["export"])


def test_a_checkpoint_from_before_an_added_key_resumes_at_its_default():
    """A saved config without ``objective.differentiation`` (written before the key existed) resumes
    when the current value is the default; any other value is a changed configuration."""
    from advalign_jax.training.checkpoints import check_meta as _check_meta

    def meta(**objective):
        return {"arch": "small_cnn", "num_classes": 10, "model_options": {}, "optimizer": "sgd",
                "objective": "pag", "config": {"seed": 0, "objective": {"pag_weight": 15.0, **objective}},
                "process_count": 1}

    old = meta()
    _check_meta(old, meta(differentiation="auto"), "ckpt")
    _check_meta(meta(differentiation="reverse_over_forward"), meta(differentiation="reverse_over_forward"), "ckpt")
    for saved, current in ((old, meta(differentiation="reverse_over_forward")),
                           (meta(differentiation="reverse_over_forward"), meta(differentiation="reverse_over_reverse")),
                           (meta(differentiation="reverse_over_reverse"), meta())):
        with pytest.raises(AdvalignError, match="objective.differentiation"):
            _check_meta(saved, current, "ckpt")
    with pytest.raises(AdvalignError, match="objective.pag_weight"):  # other keys still compared
        _check_meta(old, {**meta(differentiation="auto"),
                          "config": {"seed": 0, "objective": {"pag_weight": 5.0, "differentiation": "auto"}}}, "ckpt")
