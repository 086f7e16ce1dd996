"""``advalign-jax evaluate-sensitivity`` end to end: rows, summary with intervals, comparison, figure,
readout sites, the targeted mode, a kill and resume, and bad input (one line, nothing written)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from advalign_jax import faults
from advalign_jax.cli.main import main
from advalign_jax.data.images import load_arrays
from advalign_jax.evaluation.sensitivity import stats
from advalign_jax.models import get_model, load_model, save_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/sensitivity.py:runlocal"


def _model(path, seed):
    """A random small CNN for 16x16x3 digits (He-normal kernels)."""
    model = get_model("small_cnn", num_classes=10, widths=(8, 16), patch=4, input_size=16)
    rng = np.random.default_rng(seed)

    def fill(p, shape):
        name = p[-1].key
        if name == "kernel":
            return (rng.normal(size=shape.shape) * np.sqrt(2 / np.prod(shape.shape[:-1]))).astype(np.float32)
        return np.full(shape.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return save_model(str(path), model, jax.tree_util.tree_map_with_path(fill, model.variable_shapes()))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sens_models")
    return _model(root / "a", 0), _model(root / "b", 1)


def _args(models, workdir, *extra):
    a, b = models
    return ["evaluate-sensitivity", "--config", CONFIG, "--no-progress", f"--config.workdir={workdir}",
            f"--config.models=('a={a}', 'b={b}')", "--config.data.source=digits", "--config.data.split=test",
            "--config.max_examples=5", "--config.units.count=3", "--config.eps=(0.25, 0.5)",
            "--config.search.restarts=2", "--config.search.steps=4", "--config.batch_size=4", *extra]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_summary_comparison_and_figure(models, tmp_path, capsys):
    work = tmp_path / "run"
    assert main(_args(models, work)) == 0
    assert "normalized" in capsys.readouterr().out
    for name in ("a", "b"):
        rows = _read(work / "per_item" / f"{name}.csv")
        assert sorted(int(r["item"]) for r in rows) == list(range(2 * 3 * 5))
        for r in rows:
            assert float(r["norm"]) <= float(r["eps"]) * (1 + 1e-5)
            assert float(r["sensitivity"]) == pytest.approx(abs(float(r["response"]) - float(r["clean"])), rel=1e-4,
                                                            abs=1e-5)
    summary = _read(work / "summary.csv")
    assert [(r["model"], float(r["eps"])) for r in summary] == [("a", 0.25), ("a", 0.5), ("b", 0.25), ("b", 0.5)]
    for r in summary:
        assert float(r["normalized_low"]) <= float(r["normalized"]) <= float(r["normalized_high"])
        assert float(r["baseline_low"]) <= float(r["baseline"]) <= float(r["baseline_high"])
        assert int(r["num_units"]) + int(r["left_out_units"]) == 3 and int(r["num_images"]) == 5
    # the summary is the mean of the rows over units and images of s / sigma, sigma over the clean images
    rows = _read(work / "per_item" / "a.csv")
    clean = {}
    for r in rows:
        clean.setdefault(r["unit"], {})[int(r["image"])] = float(r["clean"])
    sigma = {u: np.std([v[i] for i in range(5)]) for u, v in clean.items()}
    mine = np.mean([float(r["sensitivity"]) / sigma[r["unit"]] for r in rows if float(r["eps"]) == 0.5])
    assert float(summary[1]["normalized"]) == pytest.approx(mine, rel=1e-4)
    comparison = _read(work / "comparison.csv")
    assert [(r["model_a"], r["model_b"], float(r["eps"])) for r in comparison] == [("a", "b", 0.25), ("a", "b", 0.5)]
    assert float(comparison[1]["ratio"]) == pytest.approx(float(summary[1]["normalized"]) /
                                                          float(summary[3]["normalized"]), rel=1e-4)
    assert os.path.getsize(work / "sensitivity.png") > 1000
    # a finished rerun writes nothing; another eps grid in the same workdir is refused
    before = {p: os.path.getmtime(work / p) for p in ("summary.csv", "comparison.csv", "sensitivity.png")}
    assert main(_args(models, work)) == 0
    assert before == {p: os.path.getmtime(work / p) for p in before}
    assert main(_args(models, work, "--config.eps=(0.25,)")) == 2
    assert "eps" in capsys.readouterr().err


def test_killed_run_resumes_to_the_same_rows(models, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", faults.ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    cli = [sys.executable, "-m", "advalign_jax.cli.main"]
    work = tmp_path / "killed"
    killed = subprocess.run(cli + _args(models, work), cwd=REPO, env=dict(env, **{faults.ENV: f"{faults.ROWS_APPENDED}:3"}),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = _read(work / "per_item" / "a.csv")
    assert 0 < len(partial) < 30
    resumed = subprocess.run(cli + _args(models, work, "--config.batch_size=8"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "straight"
    once = subprocess.run(cli + _args(models, straight), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert once.returncode == 0, once.stderr[-2000:]
    for name in ("a", "b"):
        got = sorted(_read(work / "per_item" / f"{name}.csv"), key=lambda r: int(r["item"]))
        want = sorted(_read(straight / "per_item" / f"{name}.csv"), key=lambda r: int(r["item"]))
        assert [r["item"] for r in got] == [r["item"] for r in want]
        for g, w in zip(got, want):  # other batch sizes: float32 sums may differ in the last digit
            assert (g["unit"], g["image"], g["sign"]) == (w["unit"], w["image"], w["sign"])
            assert float(g["sensitivity"]) == pytest.approx(float(w["sensitivity"]), rel=1e-4, abs=1e-6)


def test_sites_through_a_readout(models, tmp_path):
    """Recordings that are a linear function of model a's features: the readout predicts them, and the
    sites are measured through it."""
    model, variables = load_model(models[0])
    x, _ = load_arrays("digits", "test", None, 60)
    feats = np.asarray(model.intermediates(variables, x)["features"], np.float64)
    rng = np.random.default_rng(0)
    responses = feats @ rng.normal(size=(feats.shape[1], 4)) + 0.01 * rng.normal(size=(60, 4))
    responses = np.concatenate([responses, np.ones((60, 1))], axis=1)  # a silent site
    path = tmp_path / "rec.npz"
    np.savez(path, images=(x * 255).round().astype(np.uint8), responses=responses,
             sites=np.array(["s0", "s1", "s2", "s3", "flat"]))
    work = tmp_path / "sites"
    assert main(_args(models, work, f"--config.recordings={path}", "--config.units.count=0",
                      "--config.readout.n_components=16")) == 0
    readout = _read(work / "readout.csv")
    used = [r for r in readout if r["model"] == "a" and r["used"] == "1"]
    assert [r["site"] for r in used] == ["s0", "s1", "s2", "s3"]
    assert min(float(r["predictivity"]) for r in used) > 0.9
    assert [r["used"] for r in readout if r["site"] == "flat"] == ["0", "0"]
    rows = _read(work / "per_item" / "a.csv")
    assert {r["unit"] for r in rows} == {"s0", "s1", "s2", "s3"}
    summary = _read(work / "summary.csv")
    assert float(summary[0]["readout_r"]) > 0.9 and int(summary[0]["num_units"]) == 4
    assert int(summary[0]["left_out_units"]) == 1  # the silent site: reported, left out, counted
    assert {float(r["normalized"]) > 0 for r in summary} == {True}
    comparison = _read(work / "comparison.csv")
    assert len(comparison) == 2  # the same sites of two models: units paired


def test_targeted_mode_reaches_a_level(models, tmp_path):
    work = tmp_path / "targeted"
    assert main(_args(models, work, "--config.mode=targeted", "--config.target.kind=sigma",
                      "--config.target.level=2.0", "--config.eps=(0.05, 3.0)", "--config.search.steps=20",
                      "--config.search.decay=0.5")) == 0
    summary = _read(work / "summary.csv")
    small, large = summary[0], summary[1]
    assert float(large["target_distance"]) < float(small["target_distance"])
    assert float(large["target_reached"]) > 0.5
    rows = _read(work / "per_item" / "a.csv")
    assert all(r["target"] != "" for r in rows)


def test_units_pair_baseline_matches_all_pairs():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(3, 7))
    sigma = stats.unit_sigma(clean)
    pairs = [[abs(c[j] - c[k]) for j in range(7) for k in range(7) if j != k] for c in clean]
    np.testing.assert_allclose(stats.pair_baseline(clean, sigma), np.mean(pairs, axis=1) / clean.std(axis=1))


@pytest.mark.parametrize("override, message", [
    ("--config.layer=stage9_out", "has no such layer; its layers: stem_out"),
    ("--config.units.indices=(0, 99)", "unit 99 is out of range"),
    ("--config.eps=(0.5, -1.0)", "every radius must be positive"),
    ("--config.search.restarts=0", "search.restarts"),
    ("--config.units.reduce=max", "units.reduce"),
    ("--config.mode=sideways", "mode must be"),
])
def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path, capsys, override, message):
    work = tmp_path / "bad"
    assert main(_args(models, work, override)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(work)


def test_bad_recordings_are_one_line(models, tmp_path, capsys):
    x, _ = load_arrays("digits", "test", None, 10)
    path = tmp_path / "rec.npz"
    np.savez(path, images=x, responses=np.ones((9, 2)))
    assert main(_args(models, tmp_path / "bad", f"--config.recordings={path}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rec.npz" in err[0], err
    assert not os.path.exists(tmp_path / "bad")
