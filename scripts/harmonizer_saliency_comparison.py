"""The harmonizer with the signed channel mean (the reference) against the channel max of |gradient|,
over seeds, on the synthetic shapes: the table of docs/demonstration.md.

    python scripts/harmonizer_saliency_comparison.py [--seeds 0,1,2] [--out DIR]

Models (``results/adversarial_comparison_shapes/``, 1,000 steps of batch 64 on the shortcut shards
``data/synth``): ``vanilla_sS`` and ``harmonizer_sS`` from ``scripts/adversarial_comparison.py --study
shapes`` (run it first), and ``harmonizer_absmax_sS``, trained here if missing: ``advalign-jax train
--config configs/demo.py:harmonized --config.objective.saliency=absmax`` with the same seed and budget.
For each seed one ``advalign-jax evaluate --config configs/adversarial_alignment.py`` run on the embedded
shard measures the three models (accuracy, the cue-swap test, the minimal attack's share on the patch),
and ``scripts/shortcut_mechanism.py`` the channel agreement of their input-gradients. ``OUT/runs.csv``
one row per model and seed, ``OUT/table.csv`` the means with 95% t-intervals.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

from advalign_jax.evaluation.stats import t_interval

SOURCE = "results/adversarial_comparison_shapes"
METRICS = (("accuracy", "accuracy"), ("cue_swap_accuracy", "cue-swap accuracy"), ("cue_follow_rate", "follows the patch"),
           ("avg_cue_mass", "attack on the patch"), ("agreement", "channel agreement"))


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="results/harmonizer_saliency")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for s in seeds:
        absmax = os.path.join(SOURCE, f"harmonizer_absmax_s{s}")
        if not os.path.isdir(os.path.join(absmax, "model")):
            run("-m", "advalign_jax.cli.main", "train", "--config", "configs/demo.py:harmonized", "--no-progress",
                f"--config.workdir={absmax}", f"--config.seed={s}", "--config.total_steps=1000",
                "--config.checkpoint_every=500", "--config.objective.saliency=absmax")
        models = {"vanilla": f"{SOURCE}/vanilla_s{s}/model", "harmonizer (mean)": f"{SOURCE}/harmonizer_s{s}/model",
                  "harmonizer (absmax)": f"{absmax}/model"}
        for path in models.values():
            if not os.path.isdir(path):
                raise SystemExit(f"{path} is missing: run `python scripts/adversarial_comparison.py --study shapes` first")
        names = {"vanilla": "vanilla", "harmonizer (mean)": "harmonizer_mean", "harmonizer (absmax)": "harmonizer_absmax"}
        work = os.path.join(args.out, f"s{s}")
        links = os.path.join(args.out, "models", f"s{s}")  # evaluate files results under the directory's name
        os.makedirs(links, exist_ok=True)
        for label, name in names.items():
            link = os.path.join(links, name)
            if not os.path.islink(link):
                os.symlink(os.path.abspath(models[label]), link)
            models[label] = link
        spec = "(" + ", ".join(f"'small_cnn={v}'" for v in models.values()) + ",)"  # ARCH=DIR
        run("-m", "advalign_jax.cli.main", "evaluate", "--config", "configs/adversarial_alignment.py", "--no-progress",
            f"--config.models={spec}", f"--config.workdir={work}")
        run("scripts/shortcut_mechanism.py", "--models", ",".join(f"{names[k]}={v}" for k, v in models.items()),
            "--out", work)
        with open(os.path.join(work, "summary.csv"), newline="") as f:
            summary = {r["model"]: r for r in csv.DictReader(f)}
        with open(os.path.join(work, "mechanism.csv"), newline="") as f:
            mech = {r["model"]: r for r in csv.DictReader(f)}
        for label, name in names.items():
            r = summary[name]
            rows.append({"model": label, "seed": s, "accuracy": float(r["accuracy"]),
                         "cue_swap_accuracy": float(r["cue_swap_accuracy"]), "cue_follow_rate": float(r["cue_follow_rate"]),
                         "avg_cue_mass": float(r["avg_cue_mass"]), "agreement": float(mech[name]["cancellation_patch"])})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = []
    for label in dict.fromkeys(r["model"] for r in rows):
        entry = {"model": label}
        for key, _ in METRICS:
            m, lo, hi = t_interval([r[key] for r in rows if r["model"] == label])
            entry[key] = f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
            entry[key + "_per_seed"] = " ".join(f"{r[key]:.3f}" for r in rows if r["model"] == label)
        table.append(entry)
    with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    print("| model | " + " | ".join(h for _, h in METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for t in table:
        print(f"| {t['model']} | " + " | ".join(t[k] for k, _ in METRICS) + " |")
    for t in table:
        print(t["model"], {k: t[k + "_per_seed"] for k, _ in METRICS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
