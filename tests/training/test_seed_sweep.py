"""The seed sweep (advalign_jax/training/seed_sweep.py) against the real trainer, its counts and its
command.

Tying the sweep to ``train``: seed s of the vmapped sweep must end with the parameters of
``train(config with seed=s)``. Both run the same float32 operations, but XLA may order them differently
under ``vmap`` on another CPU, and the toy recipe (Adam 0.01, inputs near 100) amplifies a rounding
difference by orders of magnitude within tens of steps. So each comparison is made where rounding
cannot grow into a different outcome, with a tolerance far below what a real difference (another batch,
another key, another step count) moves. On the development CPU the toy runs agree bitwise, over the
recipe's full 4,600 steps too, and the BatchNorm CNN's to 3e-8; the tolerances below (1e-4 on
parameters of order 1) allow for another CPU's rounding, and for a ReLU or max-pool unit that sits within
rounding of its kink on some step (one example's share of one step, about 5e-5):

- the toy PAG recipe with SGD at a small rate over 100 steps (two epoch boundaries, so two reshuffles):
  no amplification; a sweep fed the batches of other seeds ends about 0.08 away (checked: > 1e-3);
- the toy PAG recipe as it is (Adam 0.01) for 3 steps: each Adam step moves a parameter by about the
  rate, 1e-2, a rounding difference about 1e-8;
- the digits recipe (BatchNorm statistics, random target-class subsets drawn from the step key, ReLU and
  max-pool kinks) for 2 steps of SGD: another seed's step keys move parameters by about 1e-2
  (checked: > 1e-3).
"""

import csv
import os
import statistics

import jax
import numpy as np
import pytest

from advalign_jax.config import load_config
from advalign_jax.errors import ConfigError
from advalign_jax.models import load_model
from advalign_jax.training import seed_sweep as S
from advalign_jax.training import seed_sweep_cmd as cmd
from advalign_jax.training.trainer import train

QUIET = dict(progress=False, log=lambda *a: None)


def _trained(config, seed, workdir):
    c = S.with_seed(config, seed)
    c.unlock()
    c.workdir = str(workdir)
    c.num_devices = 1
    c.lock()
    result = train(c, **QUIET)
    return result, load_model(result["export"])[1]


def _assert_close(sweep_params, k, variables, atol):
    mine = jax.tree.map(lambda a: np.asarray(a[k]), sweep_params)
    for path, (a, b) in zip(jax.tree_util.tree_flatten_with_path(mine)[0],
                            zip(jax.tree.leaves(mine), jax.tree.leaves(variables))):
        np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=atol, err_msg=str(path[0]))


def _gap(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sweep_equals_the_trainer_over_epoch_boundaries(tmp_path):
    config = load_config("configs/pag_toy2d.py:pag", ["total_steps=100", "optimizer.name=sgd", "schedule.base_lr=1e-4",
                                                      f"workdir={tmp_path / 'w'}"])
    seeds = [0, 3]
    runner = S.SeedSweep(config)
    states, _ = runner.train(seeds)
    preds = runner.evaluate(states, seeds)
    counts = S.kept_counts(preds["label"], preds["clean_pred"], preds["adv_pred"])
    for k, s in enumerate(seeds):
        trained, variables = _trained(config, s, tmp_path / f"t{s}")
        _assert_close(states["params"], k, variables["params"], atol=1e-4)
        # the same evaluation: a point whose attack ends within rounding of the boundary may differ
        assert abs(counts["kept_robust"][k] - round(trained["eval_robust_accuracy"] * 600)) <= 3
        assert abs(counts["clean_correct"][k] - round(trained["eval_accuracy"] * 600)) <= 3
    # the power behind the tolerance: fed the batches of other seeds, the sweep ends far away
    streams = runner.streams
    runner.streams = lambda seeds, targets=None: streams([s + 1000 for s in seeds], targets)
    wrong, _ = runner.train(seeds)
    assert _gap(states["params"], wrong["params"]) > 1e-3


def test_sweep_equals_the_trainer_with_adam(tmp_path):
    config = load_config("configs/pag_toy2d.py:pag", ["total_steps=3", f"workdir={tmp_path / 'w'}"])
    result = S.sweep(config, [1])
    _, variables = _trained(config, 1, tmp_path / "t")
    _assert_close(result["states"]["params"], 0, variables["params"], atol=1e-4)


def test_sweep_equals_the_trainer_with_batchnorm_and_random_classes(tmp_path):
    config = load_config("configs/pag_digits.py:runlocal", ["objective.num_targets=3", "optimizer.name=sgd",
                                                            "schedule.base_lr=0.05", "total_steps=2",
                                                            f"workdir={tmp_path / 'w'}"])
    runner = S.SeedSweep(config)
    states, _ = runner.train([2])
    _, variables = _trained(config, 2, tmp_path / "t")
    _assert_close(states["params"], 0, variables["params"], atol=1e-4)
    _assert_close(states["batch_stats"], 0, variables["batch_stats"], atol=1e-4)
    # the power behind the tolerance: with another seed's step keys the sweep ends far away
    runner.step_base_key = lambda s: jax.random.PRNGKey(s + 2)
    wrong, _ = runner.train([2])
    assert _gap(states["params"], wrong["params"]) > 1e-3


def test_nearest_neighbour_tables_are_the_per_batch_search():
    from advalign_jax.training.objectives import pag as objective

    config = load_config("configs/pag_toy2d.py:pag")
    runner = S.SeedSweep(config)
    streams = runner.streams([4])
    contexts = runner.contexts([4], streams)
    table = runner.nearest_neighbour_tables(contexts)[0]
    for _ in range(3):
        batch = next(streams[0])
        searched = np.asarray(objective.targets_for(batch, contexts[0], config.objective))
        np.testing.assert_allclose(table[batch["index"]], searched, rtol=0, atol=1e-5)


def test_kept_counts_and_distribution():
    y = np.array([0, 1, 1, 0, 1])
    clean = np.array([[0, 1, 0, 0, 1], [1, 1, 1, 1, 1]])
    adv = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    c = S.kept_counts(y, clean, adv)
    # by hand: seed 0 correct clean at 0, 1, 3, 4, attacked at 0, 2, 4, both at 0, 4; seed 1 clean at
    # 1, 2, 4, attacked at 0, 1, 2, 3, both at 1, 2
    np.testing.assert_array_equal(c["clean_correct"], [4, 3])
    np.testing.assert_array_equal(c["kept_adversarial"], [3, 4])
    np.testing.assert_array_equal(c["kept_robust"], [2, 2])
    values = [352, 503, 580, 595, 597, 71, 92, 173]
    d = S.distribution(values)
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    assert (d["q1"], d["median"], d["q3"], d["min"], d["max"], d["n"]) == (q1, med, q3, 71, 597, 8)
    assert cmd.parse_seeds("4") == [0, 1, 2, 3] and cmd.parse_seeds("5-7") == [5, 6, 7] and cmd.parse_seeds("2,9") == [2, 9]
    with pytest.raises(ConfigError):
        cmd.parse_seeds("a few")


def test_command_writes_and_reuses_its_files(tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["--variants", "vanilla,pag", "--seeds", "2", "--out", out, "--no-progress", "--config.total_steps=4"]
    assert cmd.main(args) == 0
    printed = capsys.readouterr().out
    assert "kept_adversarial" in printed and "kept_robust" in printed
    with open(os.path.join(out, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in rows] == [("vanilla", "0"), ("vanilla", "1"), ("pag", "0"), ("pag", "1")]
    with open(os.path.join(out, "pag", "seed_1.csv")) as f:
        points = list(csv.DictReader(f))
    assert len(points) == 600
    assert sum(int(p["kept_robust"]) for p in points) == int(rows[3]["kept_robust"])
    assert sum(int(p["adv_pred"] == p["label"]) for p in points) == int(rows[3]["kept_adversarial"])
    with open(os.path.join(out, "distribution.csv")) as f:
        dist = list(csv.DictReader(f))
    assert {(r["variant"], r["count"]) for r in dist} == {(v, c) for v in ("vanilla", "pag") for c in S.COUNTS}
    assert cmd.main(args) == 0  # the same sweep again: reused
    assert "reusing" in capsys.readouterr().out
    assert cmd.main(args[:-1] + ["--config.total_steps=5"]) == 2  # another config into the same folder
    assert "total_steps" in capsys.readouterr().err
