"""The demonstration's claims over training seeds: one table per question, one row per seed.

    bash scripts/demo_seed_study.sh                 # trains seeds 0-2, evaluates them, runs this
    python scripts/demo_seed_study.py results/seed_study

Reads STUDY/sSEED/adversarial_alignment/{summary,comparison}.csv and
STUDY/sSEED/human_alignment/{summary,comparison}.csv (``advalign-jax evaluate`` and
``advalign-jax evaluate-clickme`` of that seed's three models on the same images) and prints, as
Markdown:

1. per model and seed: clean accuracy, the cue-swap test (accuracy with another class's patch colour,
   with its 95% bootstrap interval; accuracy with the label's own colour; share of swapped images
   classified as the painted class), the mean minimal eps, adversarial alignment (Spearman of the
   attack with the human map), the share of the attack on the patch, and the human-alignment score;
2. per pair of models, metric and seed: the paired difference ``b - a`` on the same images with its
   95% bootstrap interval and Wilcoxon p-value, and how many seeds' intervals exclude 0 each way.

Writes the same tables to STUDY/seed_study.md.
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import re
import sys

MODELS = ("small_cnn_vanilla", "small_cnn_randomcue", "small_cnn_harmonized")
PAIR_METRICS = (("adversarial_alignment", "cue_swap_correct", "cue-swap accuracy"),
                ("adversarial_alignment", "spearman", "adversarial alignment (Spearman)"),
                ("adversarial_alignment", "eps", "minimal eps"),
                ("adversarial_alignment", "cue_mass", "attack on the patch (share)"),
                ("human_alignment", "human_alignment", "human-alignment score"),
                ("human_alignment", "accuracy", "clean accuracy"),
                ("human_alignment", "cue_mass", "saliency on the patch (share)"))


def read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def interval(row: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    m, lo, hi = (num(row.get(k)) * scale for k in (key, f"{key}_low", f"{key}_high"))
    if not math.isfinite(m):
        return "-"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def seeds_of(study: str) -> list[int]:
    found = [re.fullmatch(r"s(\d+)", os.path.basename(p)) for p in glob.glob(os.path.join(study, "s*"))]
    return sorted(int(m.group(1)) for m in found if m)


def model_table(study: str, seeds: list[int]) -> list[str]:
    lines = ["| model | seed | accuracy | cue-swap accuracy | congruent accuracy | follows the patch | "
             "mean minimal eps | adversarial alignment | attack on the patch | human-alignment score |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        for seed in seeds:
            aa = {r["model"]: r for r in read(os.path.join(study, f"s{seed}", "adversarial_alignment", "summary.csv"))}
            ha = {r["model"]: r for r in read(os.path.join(study, f"s{seed}", "human_alignment", "summary.csv"))}
            a, h = aa.get(name), ha.get(name)
            if a is None or h is None:
                continue
            lines.append(f"| {name} | {seed} | {interval(h, 'accuracy')} | {interval(a, 'cue_swap_accuracy')} | "
                         f"{num(a['cue_congruent_accuracy']):.3g} | {num(a['cue_follow_rate']):.3g} | "
                         f"{interval(a, 'avg_eps')} | {interval(a, 'avg_spearman')} | "
                         f"{interval(a, 'avg_cue_mass')} | {interval(h, 'human_alignment')} |")
    return lines


def pair_table(study: str, seeds: list[int]) -> list[str]:
    lines = ["| metric | a | b | b - a per seed: mean [95% CI], Wilcoxon p | seeds with CI > 0 / < 0 |",
             "|---|---|---|---|---|"]
    comparisons = {(seed, job): read(os.path.join(study, f"s{seed}", job, "comparison.csv"))
                   for seed in seeds for job in ("adversarial_alignment", "human_alignment")}
    for job, metric, label in PAIR_METRICS:
        for i, a in enumerate(MODELS):
            for b in MODELS[i + 1:]:
                cells, above, below = [], 0, 0
                for seed in seeds:
                    row = next((r for r in comparisons[(seed, job)] if r["metric"] == metric
                                and r["model_a"] == a and r["model_b"] == b), None)
                    if row is None:
                        continue
                    d, lo, hi, p = (num(row[k]) for k in ("diff", "diff_low", "diff_high", "wilcoxon_p"))
                    above += lo > 0
                    below += hi < 0
                    cells.append(f"s{seed}: {d:+.3g} [{lo:+.3g}, {hi:+.3g}] p={p:.2g}")
                if cells:
                    lines.append(f"| {label} | {a} | {b} | {'; '.join(cells)} | {above} / {below} of {len(cells)} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default="results/seed_study", help="the study folder (default %(default)s)")
    args = parser.parse_args(argv)
    seeds = seeds_of(args.study)
    if not seeds:
        print(f"no seed folders (s0, s1, ...) in {args.study}", file=sys.stderr)
        return 2
    text = "\n".join(["## Per model and seed", "", *model_table(args.study, seeds), "",
                      "## Paired differences on the same images", "", *pair_table(args.study, seeds), ""])
    print(text)
    with open(os.path.join(args.study, "seed_study.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
