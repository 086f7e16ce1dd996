"""Result files shared by the evaluations: per-image CSVs written batch by batch and read back on
resume, summary CSVs rewritten atomically, and the workdir's record of the configuration that made them."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Sequence

from advalign_jax.errors import AdvalignError
from advalign_jax.store import fmt, write_csv  # noqa: F401  (re-exported)


class PerImageFile:
    """One model's per-image CSV: appended batch by batch (flushed to disk), read back on resume.

    Rows are keyed by ``img`` (the record index); a line cut short by an interruption is dropped when
    the file is reopened, and a row for an image already present is never written twice.
    """

    def __init__(self, path: str, columns: Sequence[str]):
        self.path = path
        self.columns = list(columns)
        self.rows: dict[int, dict] = {}
        if not os.path.exists(path):
            return
        with open(path, newline="") as f:
            lines = f.read().splitlines()
        if lines and next(csv.reader([lines[0]])) != self.columns:
            raise AdvalignError(f"{path}: not a per-image results file of this evaluation (unexpected header)")
        good = lines[:1]
        for line in lines[1:]:
            fields = next(csv.reader([line]))
            if len(fields) != len(self.columns):
                continue  # cut short by an interruption
            row = dict(zip(self.columns, fields))
            if int(row["img"]) not in self.rows:
                self.rows[int(row["img"])] = row
                good.append(line)
        with open(path + ".tmp", "w", newline="") as f:
            f.write("\n".join(good) + "\n")
        os.replace(path + ".tmp", path)

    def append(self, rows: Sequence[dict]) -> None:
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.columns)
            writer.writerows([[fmt(r[c]) for c in self.columns] for r in rows])
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[int(r["img"])] = {c: fmt(r[c]) for c in self.columns}


def read_csv_by(path: str, key: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {r[key]: r for r in csv.DictReader(f)}


def merge_summary(path: str, columns: Sequence[str], row: dict, order: Sequence[str]) -> dict:
    """Puts ``row`` into the summary CSV at ``path`` (other models' rows kept; ``order`` first)."""
    existing = read_csv_by(path, "model")
    existing[row["model"]] = row
    ordered = [existing[n] for n in order if n in existing] + [r for n, r in existing.items() if n not in order]
    write_csv(path, columns, ordered)
    return existing


def check_workdir(workdir: str, config, keys: Sequence[str]) -> None:
    """Refuses a workdir whose ``config.json`` records different values for ``keys``; writes it otherwise."""
    path = os.path.join(workdir, "config.json")
    current = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k] for k in keys}
    current = json.loads(json.dumps(current))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for key in keys:
            if saved.get(key) != current[key]:
                raise AdvalignError(f"{workdir} holds results of a different configuration "
                                    f"({_first_difference(saved.get(key), current[key], key)}); "
                                    "use another --config.workdir or remove that folder")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(current, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _first_difference(a, b, key):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{key}.{k}")
    return f"{key}: {a!r} there, {b!r} now"


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A fixed-width text table."""
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
