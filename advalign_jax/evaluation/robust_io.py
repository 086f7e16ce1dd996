"""The files of ``advalign-jax evaluate-robust``: per-example rows, ``summary.csv``, ``time.json`` and
the printed table. File formats only; the arithmetic is in :mod:`advalign_jax.evaluation.robustness`.

- ``per_example.csv``: :func:`per_example_columns`; :func:`csv_rows` makes the rows of a batch's
  records, :func:`arrays_from_csv` reads them back into the arrays :func:`~advalign_jax.evaluation.
  robustness.summarise` takes, :func:`row_validator` rejects rows whose values do not parse (they are
  dropped and recomputed on resume, :class:`advalign_jax.store.RowFile`).
- ``summary.csv``: :data:`SUMMARY_COLUMNS`, :func:`summary_rows`; :func:`write_summary` replaces it
  atomically, and only when its text changed (a finished rerun writes nothing).
- ``time.json``: the job's wall-clock seconds and each attack's and stage's (:func:`load_times`,
  :func:`save_times`).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np

from advalign_jax import store
from advalign_jax.evaluation.robust_attacks import Attack, Cascade
from advalign_jax.evaluation.runner import format_table

SUMMARY_COLUMNS = ["model", "attack", "stage", "norm", "eps", "num_examples", "clean_accuracy", "robust_accuracy",
                   "adversarial_accuracy", "max_perturbation", "wall_time_s", "stage_time_s", "checks"]


def per_example_columns(attacks: Sequence[Attack]) -> list:
    """The columns of ``per_example.csv`` (the module docstring of :mod:`robustness`)."""
    cols = ["img", "label", "clean_pred", "grad_zero"]
    for a in attacks:
        cols += [f"{a.name}/pred", f"{a.name}/robust", f"{a.name}/norm"]
        if isinstance(a, Cascade):
            cols.append(f"{a.name}/stage")
    return cols + ["robust_to_all"]


def csv_rows(index, rec: dict, attacks: Sequence[Attack]) -> list:
    """The ``per_example.csv`` rows of a batch: ``index`` its dataset positions, ``rec`` its records."""
    rows = []
    for k, img in enumerate(index):
        row = {"img": int(img), "label": int(rec["label"][k]), "clean_pred": int(rec["clean_pred"][k]),
               "grad_zero": int(rec["grad_zero"][k]), "robust_to_all": int(rec["robust_to_all"][k])}
        for a in attacks:
            row[f"{a.name}/pred"] = int(rec[f"{a.name}/pred"][k])
            row[f"{a.name}/robust"] = int(rec[f"{a.name}/robust"][k])
            row[f"{a.name}/norm"] = float(rec[f"{a.name}/norm"][k])
            if isinstance(a, Cascade):
                s = int(rec[f"{a.name}/stage"][k])
                row[f"{a.name}/stage"] = a.stages[s][0] if s >= 0 else "none"
        rows.append(row)
    return rows


def arrays_from_csv(rows: Sequence[dict], attacks: Sequence[Attack]) -> dict:
    """Per-example CSV rows (strings) -> the arrays :func:`summarise` takes."""
    def col(key, kind):
        return np.array([kind(r[key]) for r in rows], dtype=kind)

    out = {"label": col("label", int), "clean_pred": col("clean_pred", int),
           "grad_zero": col("grad_zero", int).astype(bool), "robust_to_all": col("robust_to_all", int).astype(bool)}
    out["clean_correct"] = out["clean_pred"] == out["label"]
    for a in attacks:
        out[f"{a.name}/pred"] = col(f"{a.name}/pred", int)
        out[f"{a.name}/robust"] = col(f"{a.name}/robust", int).astype(bool)
        out[f"{a.name}/norm"] = col(f"{a.name}/norm", float)
        if isinstance(a, Cascade):
            names = [s for s, _ in a.stages]
            out[f"{a.name}/stage"] = np.array([names.index(r[f"{a.name}/stage"]) if r[f"{a.name}/stage"] != "none"
                                               else -1 for r in rows], int)
    return out


def summary_rows(model: str, summary: dict, seconds: float) -> list:
    """The rows of ``summary.csv`` (module docstring) from :func:`summarise`'s dict; ``seconds`` the
    job's wall-clock time."""
    nan = float("nan")
    base = {"model": model, "num_examples": summary["n"], "clean_accuracy": summary["clean_accuracy"],
            "wall_time_s": round(seconds, 3)}

    def t(v):
        return round(v, 3) if isinstance(v, float) and not math.isnan(v) else nan

    rows = []
    for name, s in summary["attacks"].items():
        rows.append({**base, "attack": name, "stage": "", "norm": s["norm"], "eps": s["eps"],
                     "robust_accuracy": s["robust_accuracy"], "adversarial_accuracy": s["adversarial_accuracy"],
                     "max_perturbation": s["max_perturbation"], "stage_time_s": t(s.get("seconds", nan)),
                     "checks": ";".join(sorted(s.get("checks", {})))})
        for stage, acc in s.get("after_stage", {}).items():
            rows.append({**base, "attack": name, "stage": stage, "norm": s["norm"], "eps": s["eps"],
                         "robust_accuracy": acc, "adversarial_accuracy": nan, "max_perturbation": nan,
                         "stage_time_s": t(s["stage_seconds"].get(stage, nan)), "checks": ""})
    every = set(summary.get("checks", {}))
    for s in summary["attacks"].values():
        every |= set(s.get("checks", {}))
    rows.append({**base, "attack": "all", "stage": "", "norm": "", "eps": nan,
                 "robust_accuracy": summary["robust_to_all"], "adversarial_accuracy": nan, "max_perturbation": nan,
                 "stage_time_s": t(sum(s.get("seconds", 0.0) for s in summary["attacks"].values())),
                 "checks": ";".join(sorted(every))})
    return rows


_MODELS: dict = {}


def row_validator(attacks: Sequence[Attack]) -> Callable[[dict], bool]:
    """A :class:`~advalign_jax.store.RowFile` validator: every column but the cascades' ``NAME/stage``
    parses as a number, and each ``NAME/stage`` names a stage of its cascade or ``none``."""
    columns = per_example_columns(attacks)
    stages = {f"{a.name}/stage": {s for s, _ in a.stages} | {"none"} for a in attacks if isinstance(a, Cascade)}
    numeric = store.numeric_row(columns, tuple(stages))

    def check(row: dict) -> bool:
        return numeric(row) and all(row[c] in names for c, names in stages.items())

    return check


def summary_text(rows: Sequence[dict]) -> str:
    """The text of ``summary.csv``."""
    return store.csv_text([SUMMARY_COLUMNS] + [[store.fmt(r.get(c, "")) for c in SUMMARY_COLUMNS] for r in rows])


def write_summary(path: str, rows: Sequence[dict]) -> bool:
    """Replaces ``summary.csv`` atomically when its text changed; returns whether it was written."""
    text = summary_text(rows)
    if os.path.exists(path):
        with open(path, newline="") as f:
            if f.read() == text:
                return False
    store.atomic_write_text(path, text)
    return True


def load_times(path: str) -> tuple:
    """``(seconds, {(attack, stage): seconds})`` of ``time.json`` (zeros when there is none)."""
    saved = store.read_json(path)
    if not saved:
        return 0.0, {}
    stages = {tuple(k.split("/", 1)): float(v) for k, v in saved.get("stages", {}).items()}
    return float(saved.get("seconds", 0.0)), stages


def save_times(path: str, spent: float, stages: dict) -> None:
    """Replaces ``time.json`` atomically."""
    store.atomic_write_json(path, {"seconds": spent, "stages": {f"{a}/{s}": v for (a, s), v in stages.items()}})


def format_summary(rows: Sequence[dict]) -> str:
    """The summary rows as a text table (accuracies in percent; time in seconds, compilation excluded)."""
    def pct(v):
        return "" if isinstance(v, float) and math.isnan(v) else f"{100 * v:.2f}%"

    def sec(v):
        return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.1f}"

    table = [{"attack": r["attack"], "stage": r["stage"] or "-", "norm": r["norm"] or "-",
              "eps": "-" if math.isnan(r["eps"]) else f"{r['eps']:.4g}", "clean": pct(r["clean_accuracy"]),
              "robust": pct(r["robust_accuracy"]), "time_s": sec(r["stage_time_s"]), "checks": r["checks"] or "-"}
             for r in rows]
    return format_table(table, ["attack", "stage", "norm", "eps", "clean", "robust", "time_s", "checks"])
