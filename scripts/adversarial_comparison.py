"""Vanilla vs PGD adversarial training vs TRADES vs PAG or the harmonizer, at matched budgets, over seeds:
each model trained by ``advalign-jax train`` and evaluated by ``advalign-jax evaluate-robust``
(AutoAttack standard under L2 and PGD-20 at two L2 radii, PGD-20 under Linf). The tables of
docs/adversarial_training.md.

    python scripts/adversarial_comparison.py [--study digits|shapes] [--seeds 0,1,2] [--out DIR]

- ``digits`` (the default): the 360 held-out digits; every method is the same small CNN, Adam 1e-3, 40
  epochs of batch 64 (``configs/adversarial_digits.py`` and, for PAG, ``configs/pag_digits.py:nn``);
  radii L2 1.0 and 2.0, Linf 0.1.
- ``shapes``: the synthetic ClickMe shapes with the corner-patch shortcut (``configs/demo.py``, its data
  made first with ``advalign-jax data synth --config configs/synthetic_clickme.py:train --out
  data/synth``), the demonstration's small CNN at 64 px for 1,000 steps of batch 64 (a third of its budget),
  evaluated on the embedded validation shard's 128 images; vanilla, PGD-AT and TRADES (L2 eps 0.25, 3
  attack steps) and the harmonizer; radii L2 0.25 and 0.5, Linf 2/255. Each run is the real command in its own workdir under
``OUT``, so an interrupted comparison resumes (finished runs are reused); ``OUT/runs.csv`` holds one row
per method and seed, ``OUT/table.csv`` the mean over seeds with its 95% t-interval, and the table is
printed in Markdown.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys

from advalign_jax.evaluation.stats import t_interval

SHAPES = ["total_steps=1000", "checkpoint_every=500"]  # a third of the demonstration's budget
SHAPES_ATTACK = ["objective.adversarial.steps=3", "objective.adversarial.step_size=0.1"]
STUDIES = {
    "digits": {
        "methods": {  # name: (config, overrides, the training attack in words)
            "vanilla": ("configs/adversarial_digits.py:vanilla", [], "none"),
            "PGD-AT L2": ("configs/adversarial_digits.py:pgd", [], "L2 eps 1.0, 7 steps"),
            "PGD-AT Linf": ("configs/adversarial_digits.py:pgd_linf", [], "Linf eps 0.1, 7 steps"),
            "TRADES L2": ("configs/adversarial_digits.py:trades", [], "L2 eps 1.0, 10 steps, beta 6"),
            "PAG (NN targets)": ("configs/pag_digits.py:nn", [], "none (input-gradient alignment)"),
        },
        "source": "digits", "radii": (1.0, 2.0, 0.1),
    },
    "shapes": {
        "methods": {
            "vanilla": ("configs/demo.py:vanilla", SHAPES, "none"),
            "PGD-AT L2": ("configs/demo.py:pgd", SHAPES + SHAPES_ATTACK, "L2 eps 0.25, 3 steps"),
            "TRADES L2": ("configs/demo.py:trades", SHAPES + SHAPES_ATTACK[:1], "L2 eps 0.25, 3 steps, beta 6"),
            "harmonizer": ("configs/demo.py:harmonized", SHAPES, "none (human-map alignment)"),
        },
        "source": "embedded", "radii": (0.25, 0.5, 2 / 255),
    },
}
COLUMNS = ["clean", "pgd_l2_1", "autoattack_l2_1", "pgd_l2_2", "pgd_linf_01", "step_time_s"]


def run(cmd: list) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "advalign_jax.cli.main", *cmd, "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)


def read(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one(out: str, study: dict, method: str, seed: int) -> dict:
    config, overrides, _ = study["methods"][method]
    tag = method.replace(" ", "_").replace("(", "").replace(")", "")
    work = os.path.join(out, f"{tag}_s{seed}")
    run(["train", "--config", config, f"--config.workdir={work}", f"--config.seed={seed}",
         *[f"--config.{o}" for o in overrides]])
    r1, r2, linf = study["radii"]
    evals = {"a": ("('pgd-l2', 'pgd-linf', 'autoattack-l2')", r1, linf), "b": ("('pgd-l2',)", r2, linf)}
    row = {"method": method, "seed": seed}
    times = [float(r["step_time_s"]) for r in read(os.path.join(work, "metrics.csv")) if r.get("step_time_s")]
    row["step_time_s"] = statistics.median(times[1:] or times)  # the first logged steps include compilation
    for name, (attacks, l2, linf) in evals.items():
        ev = os.path.join(work, f"robust_{name}")
        run(["evaluate-robust", "--config", "configs/robustness.py:runlocal", f"--config.model_dir={work}/model",
             f"--config.data.source={study['source']}", "--config.max_examples=0", f"--config.attacks={attacks}",
             f"--config.eps.l2={l2}", f"--config.eps.linf={linf}", "--config.batch_size=400",
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
    return t_interval(values)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="digits", choices=sorted(STUDIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="", help="default: results/adversarial_comparison (digits) or "
                                             "results/adversarial_comparison_shapes")
    p.add_argument("--methods", default="", help="comma-separated (default: all of the study)")
    args = p.parse_args()
    study = STUDIES[args.study]
    out = args.out or ("results/adversarial_comparison" + ("" if args.study == "digits" else f"_{args.study}"))
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(study["methods"])
    os.makedirs(out, exist_ok=True)
    rows = [one(out, study, m, s) for m in methods for s in seeds]
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["method", "seed", *COLUMNS])
        w.writeheader()
        w.writerows(rows)
    table = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        entry = {"method": m, "trained against": study["methods"][m][2], "seeds": len(mine)}
        for c in COLUMNS:
            entry[c] = interval([r[c] for r in mine])
        table.append(entry)
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seeds", *[f"{c}{s}" for c in COLUMNS for s in ("", "_low", "_high")]])
        for e in table:
            w.writerow([e["method"], e["seeds"], *[f"{v:.6g}" for c in COLUMNS for v in e[c]]])
    pct = lambda t: f"{100 * t[0]:.1f} [{100 * t[1]:.1f}, {100 * t[2]:.1f}]"  # noqa: E731
    r1, r2, linf = study["radii"]
    print(f"| method | trained against | clean % | PGD-20 L2 {r1:g} % | AutoAttack L2 {r1:g} % | PGD-20 L2 {r2:g} % | "
          f"PGD-20 Linf {linf:.3g} % | step (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for e in table:
        print(f"| {e['method']} | {e['trained against']} | {pct(e['clean'])} | {pct(e['pgd_l2_1'])} | "
              f"{pct(e['autoattack_l2_1'])} | {pct(e['pgd_l2_2'])} | {pct(e['pgd_linf_01'])} | "
              f"{1000 * e['step_time_s'][0]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
