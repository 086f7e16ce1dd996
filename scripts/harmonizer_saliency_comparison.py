"""The harmonizer's saliency reduction and lambda against vanilla, over seeds, on the synthetic shapes
with the corner-patch shortcut: the tables of docs/demonstration.md.

    python scripts/harmonizer_saliency_comparison.py [--data shortcut|strongcue] [--seeds 0,1,2]
        [--variants NAME,...] [--out DIR]

Every model is ``configs/demo.py`` at 1,000 steps of batch 64 (a third of the shipped models' budget),
trained here when its ``model/`` is missing (a partial run resumes)::

    advalign-jax train --config configs/demo.py:VARIANT --config.workdir=DIR --config.seed=S
        --config.total_steps=1000 --config.checkpoint_every=500 [--config.objective.KEY=VALUE ...]

Data (``--data``): ``shortcut``, the demonstration's shards (``data/synth``: the patch shows the label's
colour 91% of the time; models in ``results/adversarial_comparison_shapes/``, where
``scripts/adversarial_comparison.py --study shapes`` puts its vanilla and harmonizer with the same
command), or ``strongcue`` (``data/synth_strongcue``: the same images, the patch always in the label's
colour; models in ``OUT/strongcue/models/``). Missing shards are written first (``advalign-jax data
synth``). Every model is measured on the 128 embedded validation images (the patch colour drawn
independently of the label), one run per model and seed:

- ``advalign-jax evaluate --config configs/adversarial_alignment.py``: accuracy, the cue-swap test,
  the minimal attack's share on the patch (``avg_cue_mass``), adversarial alignment;
- ``advalign-jax evaluate-clickme --config configs/human_alignment.py``: the human-alignment score and
  the ``max_c |g|`` saliency's share on the patch;
- ``scripts/shortcut_mechanism.py``: the channel agreement of the input-gradient on the patch, the
  margin ``f_y - f_k`` to the painted class ``k``, the change the swap makes to it and the change the
  input-gradient predicts (its first-order term), and the patch's share of the alignment term of the
  variant's own loss (``leverage``; vanilla: the reference's signed mean).

``OUT/DATA/runs.csv``: one row per model and seed; ``OUT/DATA/table.csv``: per variant the mean over
seeds with its 95% t-interval and the per-seed values, and the same for the per-seed difference from
vanilla (the same seed). Prints the table as Markdown. About 3 minutes per harmonized model and 2 per
vanilla one on a 2-core CPU, and 1 minute of measurement per model.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import subprocess
import sys

from advalign_jax.evaluation.stats import t_interval

VARIANTS = {  # label: (workdir tag, configs/demo.py variant, objective overrides)
    "vanilla": ("vanilla", "vanilla", ()),
    "harmonizer (mean)": ("harmonizer", "harmonized", ()),
    "harmonizer (absmax)": ("harmonizer_absmax", "harmonized", ("saliency=absmax",)),
    "harmonizer (mean_abs)": ("harmonizer_mean_abs", "harmonized", ("saliency=mean_abs",)),
    "harmonizer (mean, lambda 0.3)": ("harmonizer_lambda0.3", "harmonized", ("lambda_harmonization=0.3",)),
    "harmonizer (mean, lambda 3)": ("harmonizer_lambda3", "harmonized", ("lambda_harmonization=3.0",)),
    "harmonizer (mean_abs, lambda 3)": ("harmonizer_mean_abs_lambda3", "harmonized",
                                        ("saliency=mean_abs", "lambda_harmonization=3.0")),
    "right for the right reasons": ("rrr", "rrr", ()),
    "right for the right reasons (lambda 0.01)": ("rrr_lambda0.01", "rrr", ("lambda_rrr=0.01",)),
}
DATA = {  # name: (synthetic_clickme.py variant, shard directory, models directory or None for OUT/NAME/models)
    "shortcut": ("train", "data/synth", "results/adversarial_comparison_shapes"),
    "strongcue": ("train_strongcue", "data/synth_strongcue", None),
}
METRICS = (("accuracy", "accuracy"), ("cue_swap_accuracy", "cue-swap accuracy"),
           ("cue_follow_rate", "follows the patch"), ("attack_patch", "attack on the patch"),
           ("saliency_patch", "saliency on the patch"), ("human_alignment", "human-alignment score"),
           ("agreement", "channel agreement on the patch"), ("margin", "margin f_y - f_k"),
           ("swap_change", "the swap's change of the margin"), ("swap_first_order", "its first-order prediction"),
           ("leverage", "the patch's share of the alignment term"))


def run(*args: str) -> None:
    print("+", " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)


def cli(*args: str) -> None:
    run("-m", "advalign_jax.cli.main", *args, "--no-progress")


def first_row(path: str) -> dict:
    with open(path, newline="") as f:
        return next(csv.DictReader(f))


def train(work: str, variant: str, overrides, shards: str, seed: int) -> None:
    if os.path.isdir(os.path.join(work, "model")):
        return
    files = f"--config.data.files=('{shards}/train-*.tfrecords',)"
    cli("train", "--config", f"configs/demo.py:{variant}", f"--config.workdir={work}", f"--config.seed={seed}",
        "--config.total_steps=1000", "--config.checkpoint_every=500", files,
        *[f"--config.objective.{o}" for o in overrides])


def own_reduction(label: str) -> str:
    """The channel reduction of the variant's own harmonizer loss ('mean' for vanilla: the reference's),
    or '' for a loss without one."""
    tag, variant, overrides = VARIANTS[label]
    if variant == "rrr":
        return ""
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("saliency=")), "mean")


def measure(model_dir: str, work: str, reduction: str) -> dict:
    """The evaluations of one trained model; each is skipped when its result is there."""
    spec = f"('small_cnn={os.path.abspath(model_dir)}',)"
    aa, ha = os.path.join(work, "adversarial_alignment"), os.path.join(work, "human_alignment")
    if not os.path.exists(os.path.join(aa, "summary.csv")):
        cli("evaluate", "--config", "configs/adversarial_alignment.py", f"--config.models={spec}",
            f"--config.workdir={aa}")
    if not os.path.exists(os.path.join(ha, "summary.csv")):
        cli("evaluate-clickme", "--config", "configs/human_alignment.py", f"--config.models={spec}",
            f"--config.workdir={ha}")
    mechanism = os.path.join(work, "mechanism.csv")
    if not os.path.exists(mechanism) or "leverage_mean" not in first_row(mechanism):
        run("scripts/shortcut_mechanism.py", "--models", f"model={model_dir}", "--out", work)
    a, h, m = (first_row(os.path.join(d, f)) for d, f in ((aa, "summary.csv"), (ha, "summary.csv"),
                                                           (work, "mechanism.csv")))
    return {"accuracy": float(a["accuracy"]), "cue_swap_accuracy": float(a["cue_swap_accuracy"]),
            "cue_follow_rate": float(a["cue_follow_rate"]), "attack_patch": float(a["avg_cue_mass"]),
            "saliency_patch": float(h["avg_cue_mass"]), "human_alignment": float(h["human_alignment"]),
            "agreement": float(m["cancellation_patch"]), "margin": float(m["margin"]),
            "swap_change": float(m["swap_change"]), "swap_first_order": float(m["swap_first_order"]),
            "leverage": float(m[f"leverage_{reduction}"]) if reduction else float("nan")}


def summarise(rows: list, labels: list) -> list:
    by = {(r["model"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    table = []
    for label in labels:
        entry = {"model": label, "seeds": len(seeds)}
        for key, _ in METRICS:
            vals = [by[(label, s)][key] for s in seeds]
            diffs = [by[(label, s)][key] - by[("vanilla", s)][key] for s in seeds if ("vanilla", s) in by]
            entry[key] = t_interval(vals)
            entry[key + "_per_seed"] = " ".join(f"{v:.4f}" for v in vals)
            entry[key + "_vs_vanilla"] = t_interval(diffs) if len(diffs) == len(seeds) else (float("nan"),) * 3
        table.append(entry)
    return table


def write_table(path: str, table: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        head = ["model", "seeds"]
        for key, _ in METRICS:
            head += [key, f"{key}_low", f"{key}_high", f"{key}_per_seed",
                     f"{key}_vs_vanilla", f"{key}_vs_vanilla_low", f"{key}_vs_vanilla_high"]
        w.writerow(head)
        for e in table:
            line = [e["model"], e["seeds"]]
            for key, _ in METRICS:
                line += [f"{v:.6g}" for v in e[key]] + [e[key + "_per_seed"]]
                line += [f"{v:.6g}" for v in e[key + "_vs_vanilla"]]
            w.writerow(line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="shortcut", choices=sorted(DATA))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="", help=f"comma-separated, default all: {', '.join(VARIANTS)}")
    p.add_argument("--out", default="results/harmonizer_saliency")
    args = p.parse_args()
    # commas inside a name's parentheses ("harmonizer (mean, lambda 3)") do not separate names
    labels = [v.strip() for v in re.split(r",(?![^()]*\))", args.variants)] if args.variants else list(VARIANTS)
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(map(repr, unknown))}; known: {', '.join(VARIANTS)}")
    if "vanilla" not in labels:
        labels.insert(0, "vanilla")
    seeds = [int(s) for s in args.seeds.split(",")]
    synth, shards, models = DATA[args.data]
    out = os.path.join(args.out, args.data)
    models = models or os.path.join(out, "models")
    if not glob.glob(os.path.join(shards, "train-*.tfrecords")):
        cli("data", "synth", "--config", f"configs/synthetic_clickme.py:{synth}", "--out", shards)
    rows = []
    for s in seeds:  # every model of a seed before the next seed: a partial study has whole seeds
        for label in labels:
            tag, variant, overrides = VARIANTS[label]
            work = os.path.join(models, f"{tag}_s{s}")
            train(work, variant, overrides, shards, s)
            rows.append({"model": label, "seed": s,
                         **measure(os.path.join(work, "model"), os.path.join(out, "eval", f"{tag}_s{s}"),
                                   own_reduction(label))})
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = summarise(rows, labels)
    write_table(os.path.join(out, "table.csv"), table)
    fmt = lambda t: f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"  # noqa: E731
    print(f"data: {args.data} ({shards}); seeds {args.seeds}; means with 95% t-intervals over seeds")
    print("| model | " + " | ".join(h for _, h in METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for t in table:
        print(f"| {t['model']} | " + " | ".join(fmt(t[k]) for k, _ in METRICS) + " |")
    print("\nper-seed difference from vanilla (same seed):")
    print("| model | " + " | ".join(h for _, h in METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for t in table[1:]:
        print(f"| {t['model']} | " + " | ".join(fmt(t[k + '_vs_vanilla']) for k, _ in METRICS) + " |")
    print(f"results: {os.path.join(out, 'table.csv')}, {os.path.join(out, 'runs.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
