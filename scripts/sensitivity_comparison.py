"""Unit sensitivity of vanilla, adversarially trained, TRADES, PAG and harmonized models, over seeds: the
tables and figure of docs/sensitivity.md.

    python scripts/sensitivity_comparison.py [--study digits|shapes] [--seeds 0,1,2] [--out DIR]

The models are those of ``scripts/adversarial_comparison.py`` (run it first for the same study and
seeds): ``digits``: vanilla, PGD-AT L2, PGD-AT Linf, TRADES L2 and PAG (NN targets), 16 px;
``shapes``: vanilla, PGD-AT L2, TRADES L2 and the harmonizer on the synthetic shapes, 64 px. For each
seed one ``advalign-jax evaluate-sensitivity`` run measures every model of that seed on the same images
(the first 24 test digits, or the first 12 embedded validation shapes at 64 px) and the same seeded
starts: 10 penultimate units per model (a seeded sample), L2 eps 0.25, 0.5, 1 and 2 (digits) or 0.25 and
0.5 (shapes), 4 restarts per sign, 15 + 15 steps (``configs/sensitivity.py:digits``; a 2-core CPU
budget). ``OUT/seedS/`` holds each run's files (``summary.csv``,
``comparison.csv``, ``sensitivity.png``); ``OUT/table.csv`` the mean over seeds of each model's
normalised sensitivity with its 95% t-interval and each seed's value, ``OUT/ratios.csv`` the ratio
vanilla / method per seed and eps (the study's "10x"), and ``OUT/sensitivity.png`` the curves averaged
over seeds. Interrupted, it resumes (each run resumes its workdir).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

from advalign_jax.evaluation.stats import t_interval

from advalign_jax.evaluation.sensitivity import files

STUDIES = {
    "digits": {"source": "results/adversarial_comparison", "data": ["--config.data.source=digits",
                                                                    "--config.data.split=test"],
               "methods": ["vanilla", "PGD-AT L2", "PGD-AT Linf", "TRADES L2", "PAG (NN targets)"],
               "eps": "(0.25, 0.5, 1.0, 2.0)"},
    "shapes": {"source": "results/adversarial_comparison_shapes",
               "data": ["--config.data.source=embedded", "--config.max_examples=12"],
               "methods": ["vanilla", "PGD-AT L2", "TRADES L2", "harmonizer"], "eps": "(0.25, 0.5)"},
}


def slug(method: str) -> str:
    return method.replace(" ", "_").replace("(", "").replace(")", "")


def read(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def interval(values) -> tuple:
    """Mean and its 95% t-interval over the seeds."""
    return t_interval(values)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="digits", choices=sorted(STUDIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="", help="default: results/sensitivity_STUDY")
    p.add_argument("--methods", default="", help="comma-separated, the first is the reference of the ratios "
                                                 "(default: all of the study)")
    args = p.parse_args()
    study = STUDIES[args.study]
    out = args.out or f"results/sensitivity_{args.study}"
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else study["methods"]
    per_seed = {}
    for s in seeds:
        models = [f"{slug(m)}={study['source']}/{slug(m)}_s{s}/model" for m in methods]
        work = os.path.join(out, f"seed{s}")
        cmd = [sys.executable, "-m", "advalign_jax.cli.main", "evaluate-sensitivity", "--config",
               "configs/sensitivity.py:digits", "--no-progress", f"--config.models={tuple(models)!r}",
               *study["data"], f"--config.eps={study['eps']}", f"--config.workdir={work}"]
        print("+", " ".join(cmd[2:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        per_seed[s] = read(os.path.join(work, "summary.csv"))
    eps = sorted({float(r["eps"]) for r in per_seed[seeds[0]]})
    value = {(s, r["model"], float(r["eps"])): float(r["normalized"]) for s in seeds for r in per_seed[s]}
    base = {(s, r["model"]): float(r["baseline"]) for s in seeds for r in per_seed[s]}
    table, ratios = [], []
    for m in methods:
        for e in eps:
            vals = [value[(s, slug(m), e)] for s in seeds]
            mean, lo, hi = interval(vals)
            b = interval([base[(s, slug(m))] for s in seeds])
            table.append({"method": m, "eps": e, "normalized": mean, "low": lo, "high": hi,
                          "per_seed": " ".join(f"{v:.3g}" for v in vals), "baseline": b[0]})
            if m != methods[0]:
                r = [value[(s, slug(methods[0]), e)] / value[(s, slug(m), e)] for s in seeds]
                mean, lo, hi = interval(r)
                ratios.append({"method": m, "eps": e, "ratio": mean, "low": lo, "high": hi,
                               "per_seed": " ".join(f"{v:.3g}" for v in r)})
    for name, rows in (("table.csv", table), ("ratios.csv", ratios)):
        with open(os.path.join(out, name), "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows([{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    _plot(os.path.join(out, "sensitivity.png"), table, methods, args.study)
    print("| method | " + " | ".join(f"eps {e:g}" for e in eps) + " | random pairs |")
    print("|---|" + "---|" * (len(eps) + 1))
    for m in methods:
        cells = [r for r in table if r["method"] == m]
        print(f"| {m} | " + " | ".join(f"{r['normalized']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" for r in cells)
              + f" | {cells[0]['baseline']:.2f} |")
    print()
    print(f"| {methods[0]} / method | " + " | ".join(f"eps {e:g}" for e in eps) + " |")
    print("|---|" + "---|" * len(eps))
    for m in methods[1:]:
        cells = [r for r in ratios if r["method"] == m]
        print(f"| {m} | " + " | ".join(f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" for r in cells) + " |")
    return 0


def _plot(path: str, table: list, methods: list, study: str) -> None:
    """The curves averaged over seeds, drawn as the command draws one run's (t-intervals over seeds)."""
    rows = [{"model": r["method"], "eps": r["eps"], "normalized": r["normalized"], "normalized_low": r["low"],
             "normalized_high": r["high"], "baseline": r["baseline"], "baseline_low": r["baseline"],
             "baseline_high": r["baseline"]} for r in table]
    rows.sort(key=lambda r: (methods.index(r["model"]), r["eps"]))
    files.plot(path, rows, targeted=False, log=True,
               title=f"{study}: mean over seeds (t-intervals); dashed: random pairs")


if __name__ == "__main__":
    sys.exit(main())
