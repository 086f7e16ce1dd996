"""The rows and files of the robust-accuracy evaluation: per-example rows, ``summary.csv``, ``time.json``
and the printed table. Formats only; the arithmetic is in :mod:`advalign_jax.evaluation.robust.summary`.

- per-example rows (``per_example.csv``): :func:`per_example_columns`; :func:`example_rows` makes the
  rows of a batch, :func:`arrays_from_rows` turns rows (fresh, or read back from the CSV as strings)
  into the arrays :func:`~advalign_jax.evaluation.robust.summary.summarise` takes,
  :func:`row_validator` rejects rows whose values do not parse (they are dropped and recomputed on
  resume, :class:`advalign_jax.store.RowFile`).
- ``summary.csv``: :data:`SUMMARY_COLUMNS`, :func:`summary_rows`, :func:`summary_text`.
- ``time.json``: the job's wall-clock seconds and each attack's and stage's (:func:`load_times`,
  :func:`save_times`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from advalign_jax import store
from advalign_jax.evaluation.robust.attacks import Attack, Cascade
from advalign_jax.evaluation.protocol import real
from advalign_jax.evaluation.robust.sequence import robust_records
from advalign_jax.evaluation.tables import format_table

SUMMARY_COLUMNS = ["model", "attack", "stage", "norm", "eps", "num_examples", "clean_accuracy", "robust_accuracy",
                   "adversarial_accuracy", "max_perturbation", "wall_time_s", "stage_time_s", "checks"]


def per_example_columns(attacks: Sequence[Attack]) -> list:
    """The columns of ``per_example.csv``: ``img,label,clean_pred,grad_zero`` (1 if the input gradient
    of the cross-entropy is exactly zero), per attack ``NAME/pred``, ``NAME/robust`` (0/1),
    ``NAME/norm`` (the perturbation's norm in the attack's norm) and for cascades ``NAME/stage`` (the
    stage that flipped the example, ``none`` if none), then ``robust_to_all``."""
    cols = ["img", "label", "clean_pred", "grad_zero"]
    for a in attacks:
        cols += [f"{a.name}/pred", f"{a.name}/robust", f"{a.name}/norm"]
        if isinstance(a, Cascade):
            cols.append(f"{a.name}/stage")
    return cols + ["robust_to_all"]


def example_rows(meta: dict, host: dict, attacks: Sequence[Attack]) -> list:
    """The rows of a batch's real examples (a protocol batch: ``meta`` and the gathered outputs
    ``host``), with ``NAME/x_adv`` where the outputs hold it."""
    k = real(meta)
    rec = robust_records({name: v[k] for name, v in host.items()}, meta["label"][k], attacks)
    rows = []
    for j, img in enumerate(meta["index"][k]):
        row = {"img": int(img), "label": int(rec["label"][j]), "clean_pred": int(rec["clean_pred"][j]),
               "grad_zero": int(rec["grad_zero"][j]), "robust_to_all": int(rec["robust_to_all"][j])}
        for a in attacks:
            row[f"{a.name}/pred"] = int(rec[f"{a.name}/pred"][j])
            row[f"{a.name}/robust"] = int(rec[f"{a.name}/robust"][j])
            row[f"{a.name}/norm"] = float(rec[f"{a.name}/norm"][j])
            if isinstance(a, Cascade):
                s = int(rec[f"{a.name}/stage"][j])
                row[f"{a.name}/stage"] = a.stages[s][0] if s >= 0 else "none"
            if f"{a.name}/x_adv" in rec:
                row[f"{a.name}/x_adv"] = rec[f"{a.name}/x_adv"][j]
        rows.append(row)
    return rows


def arrays_from_rows(rows: Sequence[dict], attacks: Sequence[Attack]) -> dict:
    """Per-example rows (values, or the CSV's strings) -> arrays over the examples in row order:
    ``index``, ``label``, ``clean_pred``, ``grad_zero``, ``clean_correct``, ``robust_to_all``, and per
    attack ``NAME/pred``, ``NAME/robust``, ``NAME/norm``, ``NAME/stage`` (stage number, -1 for none)
    and ``NAME/x_adv`` where the rows hold it."""
    def col(key, kind):
        return np.array([kind(r[key]) for r in rows], dtype=kind)

    out = {"index": col("img", int), "label": col("label", int), "clean_pred": col("clean_pred", int),
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
        if rows and f"{a.name}/x_adv" in rows[0]:
            out[f"{a.name}/x_adv"] = np.stack([r[f"{a.name}/x_adv"] for r in rows])
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


def times_from_json(saved: dict) -> tuple:
    """``(seconds, {(attack, stage): seconds})`` of a ``time.json`` value (zeros for ``{}``)."""
    if not saved:
        return 0.0, {}
    stages = {tuple(k.split("/", 1)): float(v) for k, v in saved.get("stages", {}).items()}
    return float(saved.get("seconds", 0.0)), stages


def times_to_json(spent: float, stages: dict) -> dict:
    """The ``time.json`` value of the job's seconds and each attack's and stage's."""
    return {"seconds": spent, "stages": {f"{a}/{s}": v for (a, s), v in stages.items()}}


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
