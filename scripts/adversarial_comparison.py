"""Vanilla vs PGD adversarial training (L2, Linf) vs TRADES vs PAG on digits, at matched budgets, over
seeds: each model trained by ``advalign-jax train`` and evaluated by ``advalign-jax evaluate-robust``
(AutoAttack standard under L2 and PGD-20 at two L2 radii, PGD-20 under Linf) on the 360 held-out
digits. The table of docs/adversarial_training.md.

    python scripts/adversarial_comparison.py [--seeds 0,1,2] [--out results/adversarial_comparison]

Every method is the same small CNN, Adam 1e-3, 40 epochs of batch 64 (``configs/adversarial_digits.py``
and, for PAG, ``configs/pag_digits.py:nn``). Each run is the real command in its own workdir under
``OUT``, so an interrupted comparison resumes (finished runs are reused); ``OUT/runs.csv`` holds one row
per method and seed, ``OUT/table.csv`` the mean over seeds with its 95% t-interval, and the table is
printed in Markdown.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys

from scipy import stats

METHODS = {  # name: (config, the training attack in words)
    "vanilla": ("configs/adversarial_digits.py:vanilla", "none"),
    "PGD-AT L2": ("configs/adversarial_digits.py:pgd", "L2 eps 1.0, 7 steps"),
    "PGD-AT Linf": ("configs/adversarial_digits.py:pgd_linf", "Linf eps 0.1, 7 steps"),
    "TRADES L2": ("configs/adversarial_digits.py:trades", "L2 eps 1.0, 10 steps, beta 6"),
    "PAG (NN targets)": ("configs/pag_digits.py:nn", "none (input-gradient alignment)"),
}
EVALS = {  # name: (attacks, eps.l2, eps.linf)
    "a": ("('pgd-l2', 'pgd-linf', 'autoattack-l2')", 1.0, 0.1),
    "b": ("('pgd-l2',)", 2.0, 0.1),
}
COLUMNS = ["clean", "pgd_l2_1", "autoattack_l2_1", "pgd_l2_2", "pgd_linf_01", "step_time_s"]


def run(cmd: list) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "advalign_jax.cli.main", *cmd, "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)


def read(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one(out: str, method: str, seed: int) -> dict:
    config, _ = METHODS[method]
    tag = method.replace(" ", "_").replace("(", "").replace(")", "")
    work = os.path.join(out, f"{tag}_s{seed}")
    run(["train", "--config", config, f"--config.workdir={work}", f"--config.seed={seed}"])
    row = {"method": method, "seed": seed}
    times = [float(r["step_time_s"]) for r in read(os.path.join(work, "metrics.csv")) if r.get("step_time_s")]
    row["step_time_s"] = statistics.median(times[1:] or times)  # the first logged steps include compilation
    for name, (attacks, l2, linf) in EVALS.items():
        ev = os.path.join(work, f"robust_{name}")
        run(["evaluate-robust", "--config", "configs/robustness.py:runlocal", f"--config.model_dir={work}/model",
             "--config.data.source=digits", "--config.max_examples=0", f"--config.attacks={attacks}",
             f"--config.eps.l2={l2}", f"--config.eps.linf={linf}", "--config.batch_size=360",
             "--config.pgd.steps=20", "--config.apgd.n_iter=100", "--config.apgd.n_target_classes=9",
             "--config.fab.n_iter=100", "--config.square.n_queries=5000", f"--config.workdir={ev}"])
        summary = {(r["attack"], r["stage"]): r for r in read(os.path.join(ev, "summary.csv"))}
        row["clean"] = float(summary[("all", "")]["clean_accuracy"])
        if name == "a":
            row["pgd_l2_1"] = float(summary[("pgd-l2", "")]["robust_accuracy"])
            row["pgd_linf_01"] = float(summary[("pgd-linf", "")]["robust_accuracy"])
            row["autoattack_l2_1"] = float(summary[("autoattack-l2", "")]["robust_accuracy"])
        else:
            row["pgd_l2_2"] = float(summary[("pgd-l2", "")]["robust_accuracy"])
    return row


def interval(values) -> tuple:
    """Mean and its 95% t-interval over the seeds."""
    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return m, m - half, m + half


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="results/adversarial_comparison")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    os.makedirs(args.out, exist_ok=True)
    rows = [one(args.out, m, s) for m in methods for s in seeds]
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["method", "seed", *COLUMNS])
        w.writeheader()
        w.writerows(rows)
    table = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        entry = {"method": m, "trained against": METHODS[m][1], "seeds": len(mine)}
        for c in COLUMNS:
            entry[c] = interval([r[c] for r in mine])
        table.append(entry)
    with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seeds", *[f"{c}{s}" for c in COLUMNS for s in ("", "_low", "_high")]])
        for e in table:
            w.writerow([e["method"], e["seeds"], *[f"{v:.6g}" for c in COLUMNS for v in e[c]]])
    pct = lambda t: f"{100 * t[0]:.1f} [{100 * t[1]:.1f}, {100 * t[2]:.1f}]"  # noqa: E731
    print("| method | trained against | clean % | PGD-20 L2 1.0 % | AutoAttack L2 1.0 % | PGD-20 L2 2.0 % | "
          "PGD-20 Linf 0.1 % | step (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for e in table:
        print(f"| {e['method']} | {e['trained against']} | {pct(e['clean'])} | {pct(e['pgd_l2_1'])} | "
              f"{pct(e['autoattack_l2_1'])} | {pct(e['pgd_l2_2'])} | {pct(e['pgd_linf_01'])} | "
              f"{1000 * e['step_time_s'][0]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
