"""The robust-features demonstration on the digits, over seeds: the tables and figures of
docs/robust_features.md.

    python scripts/robust_features_comparison.py [--seeds 0,1,2] [--out DIR] [--matching-steps N]

The source models are those of ``scripts/adversarial_comparison.py`` (run it first): for each seed S its
vanilla model (``vanilla_sS``) is the standard model, its PGD-AT L2 model (``PGD-AT_L2_sS``) the robust one.

1. **Constructed datasets** (``advalign-jax construct --config configs/robust_features.py:digits_KIND``,
   seed S): ``det``, ``rand`` (the targeted L2 attack on the standard model, eps 1.0, step 0.1, 100 steps),
   ``robust`` (matching the robust model's penultimate features from another training image),
   ``non_robust`` (the same on the standard model), over the 1,437 training digits; then a fresh small CNN
   (``configs/adversarial_digits.py:vanilla``, seed S) trained on each and tested on the **original** 360
   test digits: clean accuracy and PGD-20 L2 1.0 accuracy (the trainer's final evaluation), and the share
   labelled ``(y + 1) mod 10`` (what learning D_det's robust features would give). ``OUT/datasets.csv``
   has one row per kind and seed, ``OUT/datasets_table.csv`` the means with 95% t-intervals.
2. **Generation** (``advalign-jax synthesize --config configs/synthesize.py:digits``, seed S): vanilla, PGD-AT L2,
   TRADES L2 and PAG models of seed S generate 10 images per class, from the papers' class-Gaussian seeds
   (``class``; every task) and from one Gaussian of all digits (``pooled``: the seed carries no class);
   the judge is the vanilla model of seed S + 1 (mod 3, another training run). ``OUT/generation.csv`` per
   model and seed, ``OUT/generation_table.csv`` the means with intervals, ``OUT/generation_KIND.png`` one
   sample per class and generator (seed 0), ``OUT/inversion.png`` the inversions (seed 0),
   ``OUT/synth_KIND_sS/MODEL/*.png`` every grid.

Each step is the real command in its own workdir, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np

from advalign_jax.data.images import load_arrays
from advalign_jax.evaluation.stats import t_interval
from advalign_jax.models import load_model
from advalign_jax.synthesis.figures import grid

SOURCE = "results/adversarial_comparison"
KINDS = ("det", "rand", "robust", "non_robust")
GENERATORS = {"vanilla": "vanilla", "PGD-AT_L2": "PGD-AT_L2", "TRADES_L2": "TRADES_L2", "PAG": "PAG_NN_targets"}
SEED_KINDS = ("class", "pooled")  # the papers' class-Gaussian seeds; one Gaussian of all digits (no class)


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "advalign_jax.cli.main", *args]
    print("+", " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def model_dir(method_slug: str, seed: int) -> str:
    path = os.path.join(SOURCE, f"{method_slug}_s{seed}", "model")
    if not os.path.isdir(path):
        raise SystemExit(f"{path} is missing: run `python scripts/adversarial_comparison.py --seeds ...` first")
    return path


def last_eval(metrics_csv: str) -> dict:
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval_accuracy")]
    return {"clean": float(rows[-1]["eval_accuracy"]), "robust": float(rows[-1]["eval_robust_accuracy"])}


def shifted_accuracy(model_path: str) -> float:
    """The share of the original test digits the model labels ``(y + 1) mod 10``: what a model that
    learned the robust features of D_det (the digit, paired there with the next label) does."""
    model, variables = load_model(model_path)
    x, y = load_arrays("digits", "test")
    pred = np.argmax(np.asarray(model.apply(variables, x)), axis=1)
    return float(np.mean(pred == (y + 1) % 10))


def figure(work: str, path: str, task: str) -> None:
    """One row per generator under a first row of its common inputs: for ``generate`` the seeds and the
    first image of each class, for ``invert`` the target digits and their inversions from noise."""
    rows, labels = [], []
    for name in GENERATORS:
        with np.load(os.path.join(work, name, f"{task}.npz")) as f:
            pick = ([int(np.flatnonzero(f["cls"] == c)[0]) for c in np.unique(f["cls"])] if task == "generate"
                    else slice(None))
            if not rows:
                rows.append((f["seed"] if task == "generate" else f["x"])[pick])
                labels.append("seed" if task == "generate" else "target")
            rows.append(f["image"][pick])
            labels.append(name)
    if task == "generate":
        grid(path, rows, labels, title="class-conditional generation, digits (one sample per class)",
             col_labels=[str(c) for c in range(len(rows[0]))])
    else:
        grid(path, rows, labels, title="representation inversion from noise, digits")


def fmt_interval(values) -> str:
    m, lo, hi = t_interval(values)
    return f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def write_csv(path: str, rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="results/robust_features_comparison")
    p.add_argument("--matching-steps", type=int, default=1000, help="steps of the robust / non-robust matching")
    p.add_argument("--skip-generation", action="store_true")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)

    rows = []
    for s in seeds:
        for kind in KINDS:
            src = model_dir("PGD-AT_L2" if kind == "robust" else "vanilla", s)
            data = os.path.join(args.out, f"{kind}_s{s}")
            cli("construct", "--config", f"configs/robust_features.py:digits_{kind}", "--no-progress",
                f"--config.model={src}", f"--config.seed={s}", f"--config.workdir={data}",
                f"--config.matching.steps={args.matching_steps}")
            with open(os.path.join(data, "dataset.json")) as f:
                meta = json.load(f)
            train = os.path.join(args.out, f"train_{kind}_s{s}")
            if not os.path.isdir(os.path.join(train, "model")):
                cli("train", "--config", "configs/adversarial_digits.py:vanilla", "--no-progress",
                    f"--config.arrays.source=constructed:{data}", f"--config.seed={s}", f"--config.workdir={train}")
            result = last_eval(os.path.join(train, "metrics.csv"))
            rows.append({"kind": kind, "seed": s, "source": src, "test_clean": result["clean"],
                         "test_pgd_l2_1": result["robust"], "test_next_label": shifted_accuracy(os.path.join(train, "model")),
                         "recipe_steps": meta["recipe"]["steps"]})
    write_csv(os.path.join(args.out, "datasets.csv"), rows)
    table = [{"kind": k, "test_clean": fmt_interval([r["test_clean"] for r in rows if r["kind"] == k]),
              "test_pgd_l2_1": fmt_interval([r["test_pgd_l2_1"] for r in rows if r["kind"] == k]),
              "test_next_label": fmt_interval([r["test_next_label"] for r in rows if r["kind"] == k]),
              "per_seed_clean": " ".join(f"{100 * r['test_clean']:.1f}" for r in rows if r["kind"] == k)}
             for k in KINDS]
    write_csv(os.path.join(args.out, "datasets_table.csv"), table)
    print("| trained on | original test clean % | PGD-20 L2 1.0 % | labelled (y + 1) mod 10 % | per seed (clean) |\n"
          "|---|---|---|---|---|")
    for t in table:
        print(f"| {t['kind']} | {t['test_clean']} | {t['test_pgd_l2_1']} | {t['test_next_label']} | {t['per_seed_clean']} |")

    if args.skip_generation:
        return 0
    gen = []
    for kind in SEED_KINDS:
        for s in seeds:
            models = tuple(f"{name}={model_dir(slug, s)}" for name, slug in GENERATORS.items())
            work = os.path.join(args.out, f"synth_{kind}_s{s}")
            judge = model_dir("vanilla", (s + 1) % 3)
            tasks = "('generate', 'invert', 'interpolate', 'visualize')" if kind == "class" else "('generate',)"
            cli("synthesize", "--config", "configs/synthesize.py:digits", "--no-progress", f"--config.models={models}",
                f"--config.judge={judge}", f"--config.seed={s}", f"--config.workdir={work}",
                f"--config.generate.seeds={kind}", f"--config.tasks={tasks}")
            with open(os.path.join(work, "summary.csv"), newline="") as f:
                for r in csv.DictReader(f):
                    if r["task"] == "generate":
                        gen.append({"seeds": kind, "model": r["model"], "seed": s,
                                    "own_accuracy": float(r["own_accuracy"]),
                                    "seed_judge_accuracy": float(r["seed_judge_accuracy"]),
                                    "judge_accuracy": float(r["judge_accuracy"]),
                                    "judge_frechet": float(r["judge_frechet"]), "l2_change": float(r["l2_change"])})
        figure(os.path.join(args.out, f"synth_{kind}_s{seeds[0]}"), os.path.join(args.out, f"generation_{kind}.png"),
               "generate")
        if kind == "class":
            figure(os.path.join(args.out, f"synth_class_s{seeds[0]}"), os.path.join(args.out, "inversion.png"), "invert")
    write_csv(os.path.join(args.out, "generation.csv"), gen)
    gtable = []
    for kind in SEED_KINDS:
        for n in GENERATORS:
            g = [x for x in gen if x["model"] == n and x["seeds"] == kind]
            m, lo, hi = t_interval([x["judge_frechet"] for x in g])
            gtable.append({"seeds": kind, "model": n, "own_accuracy": fmt_interval([x["own_accuracy"] for x in g]),
                           "seed_judge_accuracy": fmt_interval([x["seed_judge_accuracy"] for x in g]),
                           "judge_accuracy": fmt_interval([x["judge_accuracy"] for x in g]),
                           "judge_frechet": f"{m:.2f} [{lo:.2f}, {hi:.2f}]",
                           "l2_change": f"{sum(x['l2_change'] for x in g) / len(g):.2f}"})
    write_csv(os.path.join(args.out, "generation_table.csv"), gtable)
    print("\n| seeds | generator | own accuracy % | judge on the seeds % | judge on the images % | judge Frechet distance "
          "| mean L2 change |\n|---|---|---|---|---|---|---|")
    for t in gtable:
        print(f"| {t['seeds']} | {t['model']} | {t['own_accuracy']} | {t['seed_judge_accuracy']} | {t['judge_accuracy']} "
              f"| {t['judge_frechet']} | {t['l2_change']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
