"""benchmarks/device_suite.py --smoke: one command produces the whole device table (every row, finite
positive numbers) on a CPU."""

import math
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
ROWS = [("minimal-eps search", "float32"), ("minimal-eps search", "bfloat16"),
        ("CE step", "remat False"), ("CE step", "remat True"),
        ("harmonizer step", "remat False, reverse_over_reverse"), ("harmonizer step", "remat False, reverse_over_forward"),
        ("harmonizer step", "remat True, reverse_over_reverse"),
        ("PAG: plain CE step", ""),
        ("PAG step", "K=1, shared, reverse_over_reverse"), ("PAG step", "K=1, shared, reverse_over_forward"),
        ("PAG step", "K=10, shared, reverse_over_reverse"), ("PAG step", "K=10, shared, reverse_over_forward"),
        ("adversarial: plain CE step", ""), ("PGD-AT step", "K=7"), ("TRADES step", "K=10"),
        ("APGD-CE", "iterations"), ("Square", "queries"), ("sensitivity", "features units")]


def test_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "suite.md"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_suite.py"), "--smoke",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout  # the same table on stdout and in the file
    lines = text.splitlines()
    assert lines[0].startswith("device: cpu")
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:6] == ["part", "case", "images", "compile s", "run s", "images/s"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:] if line.startswith("|")]
    assert len(rows) == len(ROWS)
    for (part, case), row in zip(ROWS, rows):
        assert row[0] == part and case in row[1], (part, case, row[:2])
        for column in ("images", "compile s", "run s", "images/s", "GFLOP"):
            value = float(row[header.index(column)])
            assert math.isfinite(value) and value > 0, (part, case, column, value)
        temp = row[header.index("XLA temp MiB")]
        assert temp == "n/a" or float(temp) >= 0
