"""The commands as several JAX processes (``scripts/launch_local.sh``: coordinator on 127.0.0.1, gloo
collectives), against the same command as one process with as many devices in all.

- ``evaluate``, ``evaluate-robust`` and ``evaluate-sensitivity``: the same per-image (per-example,
  per-item) rows and summary, written by process 0 alone; ``construct``: the same dataset, bitwise;
- ``train`` (PAG toy, CE on ClickMe shards): the same parameters after a few SGD steps, up to float32
  rounding (the global batches hold the same examples, ``process_sharding='global'`` for ClickMe;
  the order of the gradient's cross-device sum differs);
- a process killed mid-run: the launcher stops the other one within seconds, with one line; the rerun
  resumes to the parameters of an uninterrupted two-process run; another process count is refused.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from advalign_jax.models import load_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ADVALIGN_JAX_CRASH_AT",
                                                         "ADVALIGN_JAX_CRASH_PROCESS")}
ENV["JAX_PLATFORMS"] = "cpu"
LAUNCH = [sys.executable, "-m", "advalign_jax.launch"]
CLI = [sys.executable, "-m", "advalign_jax.cli.main"]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    ENV["ADVALIGN_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    yield


def _env(devices, **extra):
    return {**ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def one(args, devices=4, **extra):
    return subprocess.run(CLI + args, cwd=REPO, env=_env(devices, **extra), capture_output=True, text=True,
                          timeout=600)


def two(args, devices=2, **extra):
    return subprocess.run(LAUNCH + ["2"] + CLI + args, cwd=REPO, env=_env(devices, **extra), capture_output=True,
                          text=True, timeout=600)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _leaves(path):
    return jax.tree.leaves(load_model(str(path))[1])


def _assert_same_parameters(a, b, rtol):
    for u, v in zip(_leaves(a), _leaves(b)):
        scale = float(np.max(np.abs(u))) or 1.0
        np.testing.assert_allclose(v, u, rtol=0, atol=rtol * scale)


EVALUATE = ["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
            "--config.max_images=12", "--config.data.batch_size=4"]


def test_evaluate_as_two_processes_writes_the_single_process_rows(tmp_path):
    _ok(one(EVALUATE + [f"--config.workdir={tmp_path / 'one'}"]))
    proc = _ok(two(EVALUATE + [f"--config.workdir={tmp_path / 'two'}"]))
    name = "small_cnn_vanilla.csv"
    a = (tmp_path / "one" / "per_image" / name).read_text().splitlines()
    b = (tmp_path / "two" / "per_image" / name).read_text().splitlines()
    assert a[0] == b[0] and sorted(a[1:]) == sorted(b[1:]) and len(b) == 13  # each image once, same values
    assert sum(line.split(",")[9] == "attacked" for line in b[1:]) >= 6  # the attacks ran
    sa = (tmp_path / "one" / "summary.csv").read_text().splitlines()
    sb = (tmp_path / "two" / "summary.csv").read_text().splitlines()
    drop = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # noqa: E731  (wall_time_s is last)
    assert drop(sa) == drop(sb)
    assert "[0] small_cnn_vanilla" in proc.stdout and "[1] small_cnn_vanilla" not in proc.stdout  # one speaks


ROBUST = ["evaluate-robust", "--config", "configs/robustness.py:runlocal", "--no-progress",
          "--config.attacks=('pgd-linf',)", "--config.max_examples=8", "--config.batch_size=4"]


def test_evaluate_robust_as_two_processes_writes_the_single_process_rows(tmp_path):
    _ok(one(ROBUST + [f"--config.workdir={tmp_path / 'one'}"]))
    proc = _ok(two(ROBUST + [f"--config.workdir={tmp_path / 'two'}"]))
    a = (tmp_path / "one" / "per_example.csv").read_text().splitlines()
    b = (tmp_path / "two" / "per_example.csv").read_text().splitlines()
    assert a == b and len(b) == 9  # the same rows, each example once
    drop = lambda text: [r.split(",")[:10] for r in text.splitlines()]  # noqa: E731  (times last)
    assert drop((tmp_path / "one" / "summary.csv").read_text()) == drop((tmp_path / "two" / "summary.csv").read_text())
    assert "[0] pgd-linf" in proc.stdout and "[1] pgd-linf" not in proc.stdout  # one speaks
    assert "[0] results:" in proc.stdout and "[1] results:" not in proc.stdout


SENSITIVITY = ["evaluate-sensitivity", "--config", "configs/sensitivity.py:runlocal", "--no-progress",
               "--config.models=('vanilla=checkpoints/small_cnn_vanilla',)", "--config.max_examples=3",
               "--config.units.count=2", "--config.eps=(0.5,)", "--config.search.restarts=1",
               "--config.search.steps=2", "--config.batch_size=4"]


def test_evaluate_sensitivity_as_two_processes_writes_the_single_process_rows(tmp_path):
    _ok(one(SENSITIVITY + [f"--config.workdir={tmp_path / 'one'}"]))
    proc = _ok(two(SENSITIVITY + [f"--config.workdir={tmp_path / 'two'}"]))
    a = (tmp_path / "one" / "per_item" / "vanilla.csv").read_text().splitlines()
    b = (tmp_path / "two" / "per_item" / "vanilla.csv").read_text().splitlines()
    assert a[0] == b[0] and sorted(a[1:]) == sorted(b[1:]) and len(b) == 7  # each item once, same values
    assert (tmp_path / "one" / "summary.csv").read_text() == (tmp_path / "two" / "summary.csv").read_text()
    assert "[0] results:" in proc.stdout and "[1] results:" not in proc.stdout


CONSTRUCT = ["construct", "--config", "configs/robust_features.py:runlocal", "--no-progress", "--config.kind=non_robust",
             "--config.data.limit=16", "--config.matching.steps=3", "--config.batch_size=8"]


def test_construct_as_two_processes_writes_the_single_process_dataset(tmp_path):
    _ok(one(CONSTRUCT + [f"--config.workdir={tmp_path / 'one'}"]))
    proc = _ok(two(CONSTRUCT + [f"--config.workdir={tmp_path / 'two'}"]))
    with np.load(tmp_path / "one" / "dataset.npz") as a, np.load(tmp_path / "two" / "dataset.npz") as b:
        for key in ("image", "label", "seed_index"):
            np.testing.assert_array_equal(a[key], b[key])  # the same per-device batches: bitwise
    assert "[0] dataset:" in proc.stdout and "[1] dataset:" not in proc.stdout


TOY = ["train", "--config", "configs/pag_toy2d.py:runlocal", "--no-progress", "--config.optimizer.name=sgd",
       "--config.schedule.base_lr=0.001", "--config.total_steps=3", "--config.checkpoint_every=3"]
DEMO = ["train", "--config", "configs/demo.py:runlocal", "--no-progress", "--config.optimizer.name=sgd",
        "--config.total_steps=3", "--config.checkpoint_every=3",
        "--config.data.files=('advalign_jax/data/embedded/val-0.tfrecords',)"]


@pytest.mark.parametrize("args", [TOY, DEMO], ids=["pag_toy2d", "demo_ce"])
def test_train_as_two_processes_gives_the_single_process_parameters(tmp_path, args):
    """Tolerance 1e-5 of each tensor's scale after 3 SGD steps: the same examples in every global batch,
    the gradient summed across devices in another order (float32 rounding: measured up to 2e-7 on both
    models; a wrong batch or a missed all-reduce differs by orders of magnitude more)."""
    _ok(one(args + [f"--config.workdir={tmp_path / 'one'}"]))
    _ok(two(args + [f"--config.workdir={tmp_path / 'two'}"]))
    _assert_same_parameters(tmp_path / "one" / "model", tmp_path / "two" / "model", rtol=1e-5)


def test_a_killed_process_stops_the_run_and_the_rerun_resumes(tmp_path):
    args = TOY[:-2] + ["--config.total_steps=40", "--config.checkpoint_every=10", "--config.log_every=10"]
    _ok(two(args + [f"--config.workdir={tmp_path / 'straight'}"]))
    work = [f"--config.workdir={tmp_path / 'killed'}"]
    start = time.perf_counter()
    died = two(args + work, ADVALIGN_JAX_CRASH_AT="checkpoint.saved:2", ADVALIGN_JAX_CRASH_PROCESS="1")
    took = time.perf_counter() - start
    assert died.returncode == 128 + signal.SIGKILL, died.stderr[-3000:]
    last = died.stderr.strip().splitlines()[-1]
    assert last.startswith("launch_local: process 1 was killed by signal 9") and "rerun" in last
    assert took < 120  # the survivor was stopped, not left waiting on a collective
    # Another process count cannot take over the two processes' input-stream positions.
    other = one(args + work, devices=4)
    assert other.returncode == 2 and "resume with 2 process(es)" in other.stderr.strip().splitlines()[-1]
    again = _ok(two(args + work))
    assert "resumed from step" in again.stdout
    for u, v in zip(_leaves(tmp_path / "straight" / "model"), _leaves(tmp_path / "killed" / "model")):
        np.testing.assert_array_equal(u, v)  # bitwise: the same two-process computation


def test_targets_as_two_processes_writes_the_single_process_shards(tmp_path):
    from advalign_jax.data import target_files as F

    args = ["targets", "--source", "digits", "--limit", "120", "--method", "nearest_neighbour", "--shards", "3",
            "--no-progress"]
    _ok(one(args + ["--out", str(tmp_path / "one")], devices=1))
    _ok(two(args + ["--out", str(tmp_path / "two")], devices=1))
    read = lambda d: F.read_target_records(sorted(str(p) for p in d.glob("targets-*.tfrecords")))  # noqa: E731
    a, b = read(tmp_path / "one"), read(tmp_path / "two")
    np.testing.assert_array_equal(a.targets, b.targets)
    np.testing.assert_array_equal(a.images, b.images)
