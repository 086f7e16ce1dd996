"""Printed tables: fixed-width text of summary rows, means with their intervals, paired differences."""

from __future__ import annotations

import math
from typing import Sequence

from advalign_jax import store


def format_interval(row: dict, key: str, digits: int = 3, scale: float = 1.0) -> str:
    """``mean [low, high]`` of ``row[key]`` and its interval columns (times ``scale``), for printed tables."""
    def num(v):
        try:
            return float(v) * scale
        except (TypeError, ValueError):
            return float("nan")

    m, lo, hi = num(row.get(key)), num(row.get(f"{key}_low")), num(row.get(f"{key}_high"))
    if not math.isfinite(m):
        return "-"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A fixed-width text table (floats to 4 significant digits)."""
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else store.fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_comparison(rows: Sequence[dict]) -> str:
    """The paired differences (:func:`compare_models` rows) as a text table."""
    def p_text(p):
        return "-" if not math.isfinite(p) else f"{p:.2g}"

    table = [{"metric": r["metric"], "a": r["model_a"], "b": r["model_b"], "n": r["num_pairs"],
              "a mean": f"{r['mean_a']:.3g}" if math.isfinite(r["mean_a"]) else "-",
              "b mean": f"{r['mean_b']:.3g}" if math.isfinite(r["mean_b"]) else "-",
              "b - a [95% CI]": (f"{r['diff']:+.3g} [{r['diff_low']:+.3g}, {r['diff_high']:+.3g}]"
                                 if math.isfinite(r["diff"]) else "-"),
              "wilcoxon p": p_text(r["wilcoxon_p"]),
              "": "*" if math.isfinite(r["diff_low"]) and (r["diff_low"] > 0 or r["diff_high"] < 0) else ""}
             for r in rows]
    return format_table(table, list(table[0])) if table else ""
