"""Fault injection on the real commands, in subprocesses: what a crash, a second run, a full or
read-only disk and damaged files leave, and that a rerun completes the work exactly.

- Kills: ``kill -9`` at seeded random moments of a run, and at crash points inside a checkpoint write
  and inside a row write (``ADVALIGN_JAX_CRASH_AT``, :mod:`advalign_jax.faults`); after each, the same
  command resumes; the end result equals an uninterrupted run (bitwise parameters, identical rows).
- Two runs on one workdir: the second stops with one line naming the holder.
- A full disk (a small tmpfs) and a read-only one, where this machine lets the tests mount one
  (skipped with the reason elsewhere).
"""

import csv
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from advalign_jax.cli import main as main_module
from advalign_jax.cli.main import main
from advalign_jax.models import get_model, load_model, save_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "advalign_jax.cli.main"]
# One device per subprocess: the tiny runs start faster, and every run of a chain uses the same count.
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ADVALIGN_JAX_CRASH_AT")}
ENV["JAX_PLATFORMS"] = "cpu"


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for this module's subprocesses: reruns skip compiling."""
    ENV["ADVALIGN_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    yield

TRAIN = ["train", "--config", "configs/pag_toy2d.py:runlocal", "--no-progress", "--config.total_steps=240",
         "--config.checkpoint_every=20", "--config.log_every=10"]
EVALUATE = ["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
            "--config.max_images=40", "--config.data.image_size=32", "--config.num_panels=3"]
NUM_ROWS = 40  # 10 batches of 4


def _run(args, crash_at=None, timeout=300, env=None):
    env = dict(ENV, **(env or {}))
    if crash_at:
        env["ADVALIGN_JAX_CRASH_AT"] = crash_at
    return subprocess.run(CLI + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _second_run_is_refused(first, args, timeout):
    """Stops ``first`` (a running command holding its workdir), runs ``args`` on the same workdir, resumes
    ``first``: the second run is refused in one line naming the first's PID, and the first completes."""
    first.send_signal(signal.SIGSTOP)
    try:
        second = _run(args)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=timeout)
    assert first.returncode == 0, err[-2000:]
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"is in use by another run (PID {first.pid}" in lines[0]


def _spawn(args):
    return subprocess.Popen(CLI + args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows_in(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def _kill_at_progress(args, progress, target, delay):
    """Starts the command; once ``progress()`` reaches ``target`` waits ``delay`` seconds and sends
    SIGKILL (unless the run ended first). Returns the exit code."""
    proc = _spawn(args)
    deadline = time.time() + 300
    while proc.poll() is None and progress() < target and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.returncode


def _chain(args, kills, rng, progress, total, step, max_delay):
    """Runs ``args`` once per kill, then once more to the end. A kill is a crash point name, or
    'random': SIGKILL at a random moment after the run has made 1..``step`` units of new progress
    (rows or logged steps, ``total`` in all) plus a random delay up to ``max_delay`` s; when less than
    that is left, at a random moment of the start-up. Returns the number of killed runs."""
    killed = 0
    for kill in kills:
        if kill != "random":
            code = _run(args, crash_at=kill).returncode
        elif progress() + 1 < total:
            ahead = int(rng.integers(1, min(step, total - progress() - 1) + 1))
            code = _kill_at_progress(args, progress, progress() + ahead, float(rng.uniform(0, max_delay)))
        else:
            code = _kill_at_progress(args, lambda: 0, 0, float(rng.uniform(0.3, 2.0)))
        assert code in (0, -signal.SIGKILL), code
        killed += code == -signal.SIGKILL
    final = _run(args)
    assert final.returncode == 0, final.stderr[-2000:]
    return killed


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _without(rows, key):
    """``rows`` without the column ``key`` (a wall time, which differs between runs)."""
    return [{k: v for k, v in r.items() if k != key} for r in rows]


def _leaves(path):
    return jax.tree.leaves(load_model(str(path))[1])


# ----------------------------------------------------------------------------------------------------
# kill -9, then resume
# ----------------------------------------------------------------------------------------------------

def test_train_killed_anywhere_resumes_to_the_same_parameters(tmp_path):
    """10 kills: 4 inside checkpoint writes (between the input-stream position and the orbax state, and
    after both), 6 at random moments of training."""
    rng = np.random.default_rng(20261201)
    straight = _run(TRAIN + [f"--config.workdir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    work = tmp_path / "killed"
    kills = ["checkpoint.data_state:2", "random", "checkpoint.saved:3", "random", "random",
             "checkpoint.data_state:1", "random", "random", "checkpoint.saved:1", "random"]
    killed = _chain(TRAIN + [f"--config.workdir={work}"], kills, rng, lambda: _rows_in(work / "metrics.csv"),
                    total=25, step=3, max_delay=0.2)
    assert killed >= 8  # crash points always kill; a random kill may come after the run's end
    for u, v in zip(_leaves(tmp_path / "straight" / "model"), _leaves(work / "model")):
        np.testing.assert_array_equal(u, v)  # bitwise
    a, b = _read(tmp_path / "straight" / "metrics.csv"), _read(work / "metrics.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # each logged step once
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # A rerun of the finished run changes nothing.
    before = (work / "metrics.csv").read_text()
    assert _run(TRAIN + [f"--config.workdir={work}"]).returncode == 0
    assert (work / "metrics.csv").read_text() == before


def test_train_killed_right_after_a_checkpoint_keeps_that_steps_evaluation_row(tmp_path):
    """Killed just after the checkpoints of step 60 (an evaluation step) and of the last step: the rows of
    those steps were written before their checkpoint, so the resumed run's metrics.csv equals an
    uninterrupted run's, evaluation rows included."""
    args = TRAIN + ["--config.eval_every=60"]
    assert _run(args + [f"--config.workdir={tmp_path / 'straight'}"]).returncode == 0
    work = [f"--config.workdir={tmp_path / 'killed'}"]
    assert _run(args + work, crash_at="checkpoint.saved:3").returncode == -signal.SIGKILL  # step 60
    assert _run(args + work, crash_at="checkpoint.saved:9").returncode == -signal.SIGKILL  # step 240, the last
    final = _run(args + work)
    assert final.returncode == 0 and "already trained" in final.stdout + final.stderr, final.stderr[-2000:]
    a, b = _read(tmp_path / "straight" / "metrics.csv"), _read(tmp_path / "killed" / "metrics.csv")
    assert sum(bool(r.get("eval_accuracy")) for r in a) == 4  # steps 60, 120, 180 and the last
    assert _without(a, "step_time_s") == _without(b, "step_time_s")


@pytest.mark.parametrize("damage", ["largest_file", "every_file"])
def test_an_unreadable_checkpoint_is_moved_aside_and_an_older_one_resumed(tmp_path, damage):
    """A checkpoint whose files were damaged after it was written (halved: the largest file, the array
    data, or every file, the metadata included): one warning line, the checkpoint moved to
    checkpoints_unreadable/, the run resumed from the older checkpoint to the uninterrupted run's
    parameters (bitwise) and rows."""
    args = TRAIN + ["--config.total_steps=60"]
    assert _run(args + [f"--config.workdir={tmp_path / 'straight'}"]).returncode == 0
    work = tmp_path / "damaged"
    assert _run(TRAIN + ["--config.total_steps=40", f"--config.workdir={work}"]).returncode == 0
    files = sorted((p for p in (work / "checkpoints" / "40").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for p in files[-1:] if damage == "largest_file" else files:
        os.truncate(p, p.stat().st_size // 2)
    rerun = _run(args + [f"--config.workdir={work}"])
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr[-2000:]
    warnings = [line for line in (rerun.stdout + rerun.stderr).splitlines() if "cannot be read" in line]
    assert len(warnings) == 1 and "checkpoint 40" in warnings[0] and "resuming from step 20" in warnings[0], warnings
    assert [p.name for p in (work / "checkpoints_unreadable").iterdir()][0].startswith("40-")
    for u, v in zip(_leaves(tmp_path / "straight" / "model"), _leaves(work / "model")):
        np.testing.assert_array_equal(u, v)  # bitwise
    assert (_without(_read(tmp_path / "straight" / "metrics.csv"), "step_time_s")
            == _without(_read(work / "metrics.csv"), "step_time_s"))


@pytest.mark.parametrize("seed,kills", [
    (7, ["rows.torn:2", "random", "rows.appended:1", "random", "random"]),
    (8, ["random", "rows.torn:1", "random", "random", "rows.appended:2"]),
])
def test_evaluate_killed_anywhere_resumes_to_the_same_rows(tmp_path, seed, kills):
    """5 kills per chain: inside a row write (a torn row), right after one, and at random moments."""
    rng = np.random.default_rng(seed)
    straight = _run(EVALUATE + [f"--config.workdir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    work = tmp_path / "killed"
    name = "small_cnn_vanilla"
    killed = _chain(EVALUATE + [f"--config.workdir={work}"], kills, rng,
                    lambda: _rows_in(work / "per_image" / f"{name}.csv"), total=NUM_ROWS + 1, step=8,
                    max_delay=0.2)
    assert killed >= 4
    a = (tmp_path / "straight" / "per_image" / f"{name}.csv").read_text().splitlines()
    b = (work / "per_image" / f"{name}.csv").read_text().splitlines()
    assert a[0] == b[0] and sorted(a[1:]) == sorted(b[1:]) and len(b) == NUM_ROWS + 1  # same rows, none twice
    sa, sb = _read(tmp_path / "straight" / "summary.csv"), _read(work / "summary.csv")
    assert _without(sa, "wall_time_s") == _without(sb, "wall_time_s")
    za = np.load(tmp_path / "straight" / "panels" / f"{name}.npz")
    zb = np.load(work / "panels" / f"{name}.npz")
    assert str(za["meta"]) == str(zb["meta"])  # the same panel images, chosen by record index
    assert (work / "panels" / f"{name}.png").exists()


# ----------------------------------------------------------------------------------------------------
# Two runs, one workdir
# ----------------------------------------------------------------------------------------------------

def test_a_second_run_on_a_busy_workdir_stops_with_the_holders_pid(tmp_path):
    work = tmp_path / "w"
    first = _spawn(EVALUATE + [f"--config.workdir={work}"])
    rows = work / "per_image" / "small_cnn_vanilla.csv"
    deadline = time.time() + 240
    while not (rows.exists() and rows.stat().st_size) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    # the first run holds the workdir, mid-run, while the second starts
    _second_run_is_refused(first, EVALUATE + [f"--config.workdir={work}"], timeout=300)
    lines = rows.read_text().splitlines()
    assert len(lines) == NUM_ROWS + 1 and len(set(lines)) == NUM_ROWS + 1  # every image once


# ----------------------------------------------------------------------------------------------------
# Full and read-only disks
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs, or a skip where this machine does not let the tests mount one."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'mount failed'}): the full- "
                    "and read-only-disk checks need one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt, leave_bytes):
    """Fills the tmpfs but ``leave_bytes``."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))


def test_a_full_disk_is_one_line_and_the_rerun_completes(tmpfs, tmp_path):
    straight = tmp_path / "straight"
    assert _run(EVALUATE + [f"--config.workdir={straight}", "--config.num_panels=0"]).returncode == 0
    work = tmpfs / "w"
    _fill(tmpfs, 6 * 4096)
    full = _run(EVALUATE + [f"--config.workdir={work}", "--config.num_panels=0"])
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(lines) == 1, full.stderr
    assert "No space left on device" in lines[0] and "free space and rerun" in lines[0]
    rows = work / "per_image" / "small_cnn_vanilla.csv"
    if rows.exists():  # whatever was written is whole rows
        text = rows.read_text()
        assert text == "" or text.endswith("\n")
    os.remove(tmpfs / "filler")
    again = _run(EVALUATE + [f"--config.workdir={work}", "--config.num_panels=0"])
    assert again.returncode == 0, again.stderr
    a = (straight / "per_image" / "small_cnn_vanilla.csv").read_text().splitlines()
    b = rows.read_text().splitlines()
    assert a[0] == b[0] and sorted(a[1:]) == sorted(b[1:])


def test_train_on_a_full_disk_is_one_line(tmpfs):
    _fill(tmpfs, 8 * 4096)
    proc = _run(TRAIN + [f"--config.workdir={tmpfs / 't'}"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "No space left on device" in lines[-1], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    os.remove(tmpfs / "filler")
    proc = _run(TRAIN + [f"--config.workdir={tmpfs / 't'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_finished_run_reopens_in_a_read_only_directory(tmpfs):
    work, part = tmpfs / "w", tmpfs / "part"
    assert _run(EVALUATE + [f"--config.workdir={work}"]).returncode == 0
    assert _run(EVALUATE + [f"--config.workdir={part}"], crash_at="rows.appended:2").returncode == -signal.SIGKILL
    before = {p: p.read_bytes() for p in tmpfs.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        again = _run(EVALUATE + [f"--config.workdir={work}"])
        assert again.returncode == 0, again.stderr
        assert "small_cnn_vanilla" in again.stdout
        unfinished = _run(EVALUATE + [f"--config.workdir={part}"])
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert {p: p.read_bytes() for p in tmpfs.rglob("*") if p.is_file()} == before
    lines = unfinished.stderr.strip().splitlines()
    assert unfinished.returncode == 2 and len(lines) == 1 and "Read-only file system" in lines[0], unfinished.stderr


def test_a_truncated_compilation_cache_entry_is_one_line_and_written_again(tmp_path):
    """JAX writes a compilation-cache entry in place: a run killed during that write leaves it truncated.
    The next run says so in one line per program, compiles again, writes the entry whole (the next run
    reads it), and its rows equal the first run's."""
    cache = tmp_path / "cache"
    args = ["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
            "--config.max_images=8", "--config.data.image_size=32", "--config.num_panels=0"]

    def run(work):
        proc = _run(args + [f"--config.workdir={tmp_path / work}"], env={"ADVALIGN_JAX_CACHE_DIR": str(cache)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc, sorted((tmp_path / work / "per_image" / "small_cnn_vanilla.csv").read_text().splitlines())

    _, first = run("a")
    entries = sorted(p for p in cache.iterdir() if p.name.endswith("-cache"))
    assert entries
    for p in entries:
        os.truncate(p, p.stat().st_size // 2)
    second, rows = run("b")
    assert rows == first
    notes = [line for line in second.stderr.splitlines() if "compilation cache" in line]
    assert len(notes) == len(entries) and "Warning" not in second.stderr, second.stderr[-2000:]
    programs = sorted(p.name.rsplit("-", 2)[0] for p in entries)
    assert sorted(line.split("entry for '")[1].split("'")[0] for line in notes) == programs
    assert all(line.endswith("removed; compiled again") for line in notes)
    for p in entries:  # every entry is whole again: JAX's own decompression reads it
        assert p.exists() and main_module.remove_unreadable_cache_entries(str(cache), p.name.rsplit("-", 2)[0]) == 0


# ----------------------------------------------------------------------------------------------------
# Results keyed by what made them (in-process)
# ----------------------------------------------------------------------------------------------------

def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_another_checkpoint_under_the_same_name_is_refused(tmp_path, capsys):
    paths = []
    for seed in (0, 1):
        model = get_model("small_cnn", num_classes=10)
        paths.append(save_model(str(tmp_path / f"run{seed}" / "model"), model, model.init(jax.random.PRNGKey(seed))))
    args = ["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
            f"--config.workdir={tmp_path / 'w'}"]
    assert main(args + [f"--config.models=('small_cnn={paths[0]}',)"]) == 0
    capsys.readouterr()
    before = (tmp_path / "w" / "per_image" / "model.csv").read_text()
    assert main(args + [f"--config.models=('small_cnn={paths[1]}',)"]) == 2
    err = _one_line(capsys)
    assert paths[0] in err and paths[1] in err and "another model" in err
    assert (tmp_path / "w" / "per_image" / "model.csv").read_text() == before
    assert main(args + [f"--config.models=('small_cnn={paths[0]}',)"]) == 0  # the same one resumes


def test_a_run_that_failed_before_any_result_does_not_hold_its_workdir(tmp_path, capsys):
    empty = tmp_path / "empty-0.tfrecords"
    empty.write_bytes(b"")
    args = ["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
            f"--config.workdir={tmp_path / 'w'}"]
    assert main(args + [f"--config.data.files=('{tmp_path}/nothing-*.tfrecords',)"]) == 2
    assert "nothing-*.tfrecords" in _one_line(capsys)
    assert main(args + [f"--config.data.files=('{empty}',)"]) == 2
    err = _one_line(capsys)
    assert str(empty) in err and "no records" in err and "data.allow_empty" in err
    assert main(args + [f"--config.data.files=('{empty}',)", "--config.data.allow_empty=true"]) == 0
    capsys.readouterr()
    assert main(args + ["--config.attack.steps=4"]) == 0  # no results yet: a new configuration is taken


def test_train_refuses_a_changed_config_and_extends(tmp_path, capsys):
    base = ["train", "--config", "configs/pag_toy2d.py:runlocal", "--no-progress", f"--config.workdir={tmp_path / 't'}",
            "--config.total_steps=20", "--config.checkpoint_every=10"]
    assert main(base) == 0
    capsys.readouterr()
    for override, key in (("--config.seed=1", "seed: 0 there, 1 now"),
                          ("--config.schedule.base_lr=0.02", "schedule.base_lr: 0.01 there, 0.02 now"),
                          ("--config.objective.pag_weight=3.0", "objective.pag_weight: 5.0 there, 3.0 now")):
        assert main(base[:-2] + ["--config.total_steps=30", override]) == 2
        err = _one_line(capsys)
        assert key in err and "another configuration" in err, err
    assert main(base[:-2] + ["--config.total_steps=30", "--config.checkpoint_every=10"]) == 0
    assert "resumed from step 20" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# evaluate-robust: the same guarantees
# ----------------------------------------------------------------------------------------------------

ROBUST_ROWS = 16  # 4 batches of 4


def _robust_checkpoint(path, seed=0):
    """An untrained small CNN for 16x16 digits (quick to compile; PGD attacks every point anyway), its
    variables drawn with NumPy (faster than tracing the initialisers on a busy CPU)."""
    model = get_model("small_cnn", num_classes=10, widths=(8, 16), patch=4, input_size=16)
    rng = np.random.default_rng(seed)

    def fill(key_path, shape):
        if key_path[-1].key == "kernel":
            return (rng.normal(size=shape.shape) * np.sqrt(2 / np.prod(shape.shape[:-1]))).astype(np.float32)
        return np.full(shape.shape, 1.0 if key_path[-1].key in ("scale", "var") else 0.0, np.float32)

    return save_model(str(path), model, jax.tree_util.tree_map_with_path(fill, model.variable_shapes()))


def _robust_args(checkpoint, workdir):
    return ["evaluate-robust", "--config", "configs/robustness.py:runlocal", "--no-progress",
            f"--config.model_dir={checkpoint}", f"--config.workdir={workdir}", "--config.data.source=digits",
            f"--config.max_examples={ROBUST_ROWS}", "--config.batch_size=4", "--config.attacks=('pgd-l2',)"]


@pytest.fixture(scope="module")
def robust_straight(tmp_path_factory):
    """An uninterrupted evaluate-robust run: (checkpoint, its workdir)."""
    root = tmp_path_factory.mktemp("robust")
    checkpoint = _robust_checkpoint(root / "model")
    proc = _run(_robust_args(checkpoint, root / "straight"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return checkpoint, root / "straight"


def _same_robust_results(straight, work):
    a = (straight / "per_example.csv").read_text().splitlines()
    b = (work / "per_example.csv").read_text().splitlines()
    assert a == b and len(b) == ROBUST_ROWS + 1  # the same rows, in order, none twice
    drop = lambda rows: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]  # noqa: E731
    assert drop(_read(straight / "summary.csv")) == drop(_read(work / "summary.csv"))


def test_evaluate_robust_killed_mid_run_resumes_to_the_same_rows(robust_straight, tmp_path):
    checkpoint, straight = robust_straight
    args = _robust_args(checkpoint, tmp_path / "w")
    assert _run(args, crash_at="rows.appended:2").returncode == -signal.SIGKILL
    assert _rows_in(tmp_path / "w" / "per_example.csv") == 1 + 8  # two batches kept
    again = _run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    _same_robust_results(straight, tmp_path / "w")


def test_evaluate_robust_drops_a_torn_row_and_recomputes_it(robust_straight, tmp_path):
    checkpoint, straight = robust_straight
    args = _robust_args(checkpoint, tmp_path / "w")
    rows = tmp_path / "w" / "per_example.csv"
    assert _run(args, crash_at="rows.torn:3").returncode == -signal.SIGKILL
    assert not rows.read_bytes().endswith(b"\n")  # the file ends inside a row
    again = _run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 incomplete or damaged row(s) dropped" in again.stderr
    _same_robust_results(straight, tmp_path / "w")


def test_evaluate_robust_on_a_busy_workdir_stops_with_the_holders_pid(robust_straight, tmp_path):
    checkpoint, straight = robust_straight
    args = _robust_args(checkpoint, tmp_path / "w")
    lock = tmp_path / "w" / ".lock"
    first = _spawn(args)
    deadline = time.time() + 120
    while first.poll() is None and time.time() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.01)
    _second_run_is_refused(first, args, timeout=120)  # it holds the workdir (the lock is taken before compiling)
    _same_robust_results(straight, tmp_path / "w")


def test_evaluate_robust_refuses_another_checkpoint_under_the_same_name(tmp_path, capsys):
    """In-process: a run, a finished rerun (writes nothing), another checkpoint of the same directory
    name (refused, naming both paths), another config over results (refused), and a new config over a
    workdir without results (taken)."""
    paths = [_robust_checkpoint(tmp_path / f"run{seed}" / "model", seed) for seed in (0, 1)]
    work = tmp_path / "w"
    assert main(_robust_args(paths[0], work)) == 0
    files = lambda: {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in work.iterdir()  # noqa: E731
                     if p.name != ".lock"}
    before = files()
    assert main(_robust_args(paths[0], work)) == 0  # finished: nothing written
    assert files() == before
    capsys.readouterr()
    assert main(_robust_args(paths[1], work)) == 2
    err = _one_line(capsys)
    assert paths[0] in err and paths[1] in err and "another model" in err, err
    assert main(_robust_args(paths[0], work) + ["--config.seed=1"]) == 2
    assert "seed: 0 there, 1 now" in _one_line(capsys)
    assert files() == before
    (work / "per_example.csv").write_text((work / "per_example.csv").read_text().splitlines()[0] + "\n")
    assert main(_robust_args(paths[1], work) + ["--config.seed=1"]) == 0  # no results: a new config is taken
    assert len((work / "per_example.csv").read_text().splitlines()) == ROBUST_ROWS + 1


# ----------------------------------------------------------------------------------------------------
# Output paths that cannot be written
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["evaluate", "evaluate-robust", "train", "synth", "targets", "targets-shards"])
def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys, command):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    if command == "evaluate-robust":
        _robust_checkpoint(tmp_path / "model")
    args = {
        "evaluate": ["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                     f"--config.workdir={blocker}"],
        "evaluate-robust": _robust_args(tmp_path / "model", blocker),
        "train": ["train", "--config", "configs/pag_toy2d.py:runlocal", "--no-progress", f"--config.workdir={blocker}",
                  "--config.total_steps=2"],
        "synth": ["data", "synth", "--config", "configs/synthetic_clickme.py:runlocal", "--out", str(blocker)],
        "targets": ["targets", "--source", "toy2d", "--limit", "40", "--method", "class_mean", "--no-progress",
                    "--out", str(blocker / "t.npz")],
        "targets-shards": ["targets", "--source", "toy2d", "--limit", "40", "--method", "class_mean", "--no-progress",
                           "--shards", "2", "--out", str(blocker)],
    }[command]
    assert main(args) == 2
    err = _one_line(capsys)
    assert str(blocker) in err and ("not a directory" in err or "is a file" in err), err
    assert blocker.read_text() == "a file"
