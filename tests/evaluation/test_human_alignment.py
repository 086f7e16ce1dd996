"""The human-alignment score: saliency against PyTorch, the score's formula, and the run's files."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from advalign_jax.config import load_config
from advalign_jax.evaluation import human_alignment as ha
from advalign_jax.evaluation import saliency, stats
from advalign_jax.models import get_model, save_model
from reference_attacks import TorchMLP


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    w1, b1 = (rng.normal(size=(4 * 4 * 3, 16)) / 4).astype(np.float32), np.zeros(16, np.float32)
    w2, b2 = rng.normal(size=(16, 5)).astype(np.float32), np.zeros(5, np.float32)
    return (lambda x: jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2), TorchMLP(w1, b1, w2, b2)


def _torch_saliency(net, x, y):
    xt = torch.tensor(x, requires_grad=True)
    logits = net(xt)
    (g,) = torch.autograd.grad(logits[torch.arange(len(y)), torch.tensor(y)].sum(), xt)
    return g.abs().amax(dim=-1).numpy()


def test_gradient_saliency_matches_pytorch(mlp):
    f, net = mlp
    x = np.random.default_rng(1).uniform(size=(3, 4, 4, 3)).astype(np.float32)
    y = np.array([0, 2, 4])
    np.testing.assert_allclose(np.asarray(saliency.gradient(f, x, y)), _torch_saliency(net, x, y), rtol=1e-5,
                               atol=1e-7)


def test_smoothgrad_is_the_mean_over_noisy_copies(mlp):
    f, net = mlp
    x = np.random.default_rng(2).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    y = np.array([1, 3])
    key = jax.random.PRNGKey(7)
    ours = np.asarray(saliency.smoothgrad(f, x, y, key=key, n=5, sigma=0.2))
    span = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)
    want = np.mean([_torch_saliency(net, x + 0.2 * span * np.asarray(jax.random.normal(k, x.shape)), y)
                    for k in jax.random.split(key, 5)], axis=0)
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(saliency.smoothgrad(f, x, y, key=key, n=3, sigma=0.0)),
                               np.asarray(saliency.gradient(f, x, y)), rtol=1e-6)


def test_score_is_mean_spearman_over_the_human_ceiling():
    no_cue = {"cue_mass": "nan", "cue": "-1", "swap_cue": "-1", "swap_pred": "-1", "congruent_pred": "-1"}
    rows = [{"spearman": "0.5", "pred": "1", "label": "1", "dice": "0.4", "iou": "0.2", **no_cue},
            {"spearman": "nan", "pred": "0", "label": "1", "dice": "0.1", "iou": "0.05", **no_cue},
            {"spearman": "0.3", "pred": "2", "label": "2", "dice": "0.3", "iou": "0.1", **no_cue}]
    boot = {"resamples": 2000, "confidence": 0.95, "seed": 4}
    row = ha.summarise("m", rows, 1.0, boot=boot)
    assert row["avg_spearman"] == pytest.approx(0.4) and row["num_undefined_spearman"] == 1
    assert row["human_alignment"] == pytest.approx(0.4 / 0.65753) and row["accuracy"] == pytest.approx(2 / 3)
    # intervals: the bootstrap of the defined values; the score's is the Spearman interval over the ceiling
    low, high = stats.bootstrap_interval([0.5, 0.3], **boot)
    assert (row["avg_spearman_low"], row["avg_spearman_high"]) == (low, high)
    assert row["human_alignment_low"] == pytest.approx(low / 0.65753)
    assert row["human_alignment_high"] == pytest.approx(high / 0.65753)
    assert (row["accuracy_low"], row["accuracy_high"]) == stats.bootstrap_interval([1.0, 0.0, 1.0], **boot)
    assert np.isnan(row["cue_swap_accuracy"]) and np.isnan(row["avg_cue_mass"])  # no cue-swap test


def test_evaluate_clickme_run(tmp_path):
    model = get_model("small_cnn", num_classes=10)
    ck = save_model(str(tmp_path / "cnn"), model, model.init(jax.random.PRNGKey(0)))
    config = load_config("configs/human_alignment.py:runlocal", [f"models=('small_cnn={ck}',)",
                                                                 f"workdir={tmp_path / 'w'}"])
    summary = ha.evaluate(config, progress=False)
    with open(tmp_path / "w" / "per_image" / "cnn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and list(rows[0]) == ha.PER_IMAGE_COLUMNS
    rho = [float(r["spearman"]) for r in rows]
    assert summary[0]["avg_spearman"] == pytest.approx(np.nanmean(rho), rel=1e-5)
    assert (tmp_path / "w" / "alignment.png").exists() and (tmp_path / "w" / "panels" / "cnn.png").exists()
