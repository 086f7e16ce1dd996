"""The crash-safe store on its own: atomic files, whole rows (torn, damaged, repeated), the workdir lock
held by a live and by a dead process, and the crash points that ``faults.install`` puts into the writes."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from advalign_jax import faults, store
from advalign_jax.errors import AdvalignError, OutputError, WorkdirBusy

COLUMNS = ["img", "label", "score", "status"]


def _row(i, score=0.5, status="ok"):
    return {"img": i, "label": i % 3, "score": score, "status": status}


# ----------------------------------------------------------------------------------------------------
# Whole files
# ----------------------------------------------------------------------------------------------------

def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "summary.csv"
    store.atomic_write_text(str(path), "old\n")

    def half_then_fail(f):
        f.write("new, half")
        raise OSError(28, os.strerror(28))  # the disk filled up in the middle of the write

    with pytest.raises(OutputError, match="No space left on device"):
        store.atomic_write(str(path), half_then_fail)
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["summary.csv"]  # no temporary file left behind
    store.atomic_write_json(str(path), {"b": 1, "a": [1, 2]})
    assert store.read_json(str(path)) == {"a": [1, 2], "b": 1}


def test_write_text_if_changed_writes_only_a_change(tmp_path):
    path = str(tmp_path / "t.csv")
    assert store.write_text_if_changed(path, "a\n")
    before = os.stat(path).st_mtime_ns
    assert not store.write_text_if_changed(path, "a\n")
    assert os.stat(path).st_mtime_ns == before
    assert store.write_text_if_changed(path, "b\n") and open(path).read() == "b\n"


def test_make_dirs_and_a_file_in_the_way_are_one_line(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="it is a file"):
        store.make_dirs(str(blocker))
    with pytest.raises(OutputError, match="Not a directory|a file stands"):
        store.atomic_write_text(str(blocker / "a.csv"), "x")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AdvalignError, match="damaged"):
        store.read_json(str(tmp_path / "bad.json"))


def test_fmt_and_csv_round_trip(tmp_path):
    assert store.fmt(0.123456789) == "0.123457" and store.fmt(float("nan")) == "nan" and store.fmt(7) == "7"
    assert store.fmt(1.5e-7) == "1.5e-07"
    path = str(tmp_path / "s.csv")
    store.write_csv(path, ["a", "b"], [{"a": 1, "b": "x,y"}, {"a": 2.5}])
    assert store.read_csv(path) == [{"a": "1", "b": "x,y"}, {"a": "2.5", "b": ""}]


# ----------------------------------------------------------------------------------------------------
# Whole rows
# ----------------------------------------------------------------------------------------------------

def test_rows_are_appended_whole_and_read_back(tmp_path):
    path = str(tmp_path / "rows.csv")
    rows = store.RowFile(path, COLUMNS)
    rows.append([_row(0), _row(1)])
    rows.append([_row(1, score=9.0), _row(2)])  # img 1 is written already: kept once, the first value
    again = store.RowFile(path, COLUMNS)
    assert sorted(again.rows) == ["0", "1", "2"] and again.rows["1"]["score"] == "0.5" and again.dropped == 0
    assert open(path).read().count("\n") == 4


def test_a_torn_last_row_is_cut_back_and_a_damaged_row_dropped(tmp_path):
    path = tmp_path / "rows.csv"
    store.RowFile(str(path), COLUMNS).append([_row(0), _row(1)])
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b"2,2,0.")  # a write cut short: no newline
    messages = []
    reopened = store.RowFile(str(path), COLUMNS, log=messages.append)
    assert sorted(reopened.rows) == ["0", "1"] and reopened.dropped == 1
    assert path.read_bytes() == whole  # cut back to its last whole line, nothing rewritten
    assert len(messages) == 1 and "1 incomplete or damaged row(s) dropped" in messages[0]
    with open(path, "ab") as f:
        f.write(b"5,1,notanumber,ok\n6,1\n0,0,0.7,ok\n")  # an unparsable value, too few fields, a repeated key
    validate = store.numeric_row(COLUMNS, text_columns=("status",))
    cleaned = store.RowFile(str(path), COLUMNS, validate=validate)
    assert sorted(cleaned.rows) == ["0", "1"] and cleaned.dropped == 3 and cleaned.rows["0"]["score"] == "0.5"
    assert path.read_bytes() == whole  # the bad lines are gone from the file too


def test_a_results_file_of_another_run_is_refused(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("img,other\n0,1\n")
    with pytest.raises(AdvalignError, match="header differs"):
        store.RowFile(str(path), COLUMNS)


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "rows.csv"
    rows = store.RowFile(str(path), COLUMNS)
    rows.append([_row(0)])
    before = path.read_bytes()

    def full_disk(f, data):
        f.write(data[:5])
        f.flush()
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(store.RowFile, "write_synced", staticmethod(full_disk))
    with pytest.raises(OutputError, match="No space left"):
        rows.append([_row(1)])
    assert path.read_bytes() == before and "1" not in rows


# ----------------------------------------------------------------------------------------------------
# The workdir lock
# ----------------------------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from advalign_jax import store
    lock = store.WorkdirLock(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
""")


def test_the_lock_is_refused_while_held_and_free_once_its_holder_dies(tmp_path):
    work = str(tmp_path / "w")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, work], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusy, match=f"in use by another run \\(PID {holder.pid} on "):
            store.WorkdirLock(work)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the operating system drops the lock
        holder.wait()
    lock = store.WorkdirLock(work)  # free again: a killed run never leaves its workdir locked
    with pytest.raises(WorkdirBusy, match=f"PID {os.getpid()} "):
        store.WorkdirLock(work)  # held by this process (another open file): refused too
    lock.release()
    store.WorkdirLock(work).release()


# ----------------------------------------------------------------------------------------------------
# Crash points
# ----------------------------------------------------------------------------------------------------

WRITE_ROWS = textwrap.dedent("""
    import sys
    from advalign_jax import faults, store
    faults.install()
    rows = store.RowFile(sys.argv[1], ["img", "v"])
    for i in range(4):
        rows.append([{"img": i, "v": 0.25 * i}])
""")


@pytest.mark.parametrize("point, whole_rows, torn", [(faults.ROWS_TORN + ":2", 1, True),
                                                     (faults.ROWS_APPENDED + ":3", 3, False)])
def test_crash_points_kill_the_process_inside_and_after_a_row_write(tmp_path, point, whole_rows, torn):
    path = tmp_path / "rows.csv"
    env = dict(os.environ, **{faults.ENV: point})
    proc = subprocess.run([sys.executable, "-c", WRITE_ROWS, str(path)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes().endswith(b"\n") != torn  # a torn write ends inside a row
    reopened = store.RowFile(str(path), ["img", "v"])
    assert sorted(reopened.rows) == [str(i) for i in range(whole_rows)] and reopened.dropped == int(torn)
    clean = subprocess.run([sys.executable, "-c", WRITE_ROWS, str(tmp_path / "clean.csv")],
                           env={k: v for k, v in os.environ.items() if k != faults.ENV}, capture_output=True)
    assert clean.returncode == 0 and len(store.RowFile(str(tmp_path / "clean.csv"), ["img", "v"]).rows) == 4


def test_crash_point_names_are_the_documented_ones():
    assert faults.NAMES == ("checkpoint.data_state", "checkpoint.saved", "rows.torn", "rows.appended")
    assert not faults.reached(faults.ROWS_TORN)  # unset: nothing fires
