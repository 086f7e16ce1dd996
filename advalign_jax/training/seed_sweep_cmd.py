"""``python scripts/pag_seed_sweep.py``: the seed sweep's command and files
(:mod:`advalign_jax.training.seed_sweep` trains and evaluates; this module writes and reads).

Files: ``OUT/VARIANT/seed_S.csv`` (one row per test point), ``OUT/VARIANT/summary.csv`` and
``OUT/VARIANT/config.json`` (the variant's config without ``workdir`` and ``seed``, and its seeds: a rerun
with the same reuses the variant), ``OUT/summary.csv`` (one row per variant and seed),
``OUT/distribution.csv`` (one row per variant and count).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from advalign_jax import store
from advalign_jax.config import load_config, split_overrides
from advalign_jax.errors import AdvalignError, ConfigError
from advalign_jax.run_record import differences, resumable_part
from advalign_jax.training.seed_sweep import COUNTS, distribution, sweep

# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["variant", "seed", "n", *COUNTS, "final_loss", "finite"]
DISTRIBUTION_COLUMNS = ["variant", "count", "seeds", "n", "median", "q1", "q3", "min", "max"]


def seed_rows(result: dict, k: int) -> list:
    """The per-point rows of seed number ``k`` of a :func:`sweep` result."""
    y, c, a = result["label"], result["clean_pred"][k], result["adv_pred"][k]
    return [{"point": i, "label": int(y[i]), "clean_pred": int(c[i]), "adv_pred": int(a[i]),
             "kept_adversarial": int(a[i] == y[i]), "kept_robust": int(a[i] == y[i] and c[i] == y[i])}
            for i in range(len(y))]


SEED_COLUMNS = ["point", "label", "clean_pred", "adv_pred", "kept_adversarial", "kept_robust"]


def _config_record(config, seeds) -> dict:
    """What a variant's results depend on: its config but ``workdir`` and ``seed`` (each seed is set per
    run), and the seeds."""
    return {"config": resumable_part(config, ("workdir", "seed")), "seeds": [int(s) for s in seeds]}


def run_variant(config, variant: str, seeds: Sequence[int], out: str, progress: bool = True, log=print) -> list:
    """Sweeps one variant into ``out/variant/`` (or reuses a finished sweep of the same config and
    seeds there); returns its summary rows."""
    vdir = os.path.join(out, variant)
    record = _config_record(config, seeds)
    record_path = os.path.join(vdir, "config.json")
    saved = store.read_json(record_path)
    if saved is not None:
        differ = differences(saved["config"], record["config"])
        if differ:
            raise ConfigError(f"{vdir} holds a sweep of another config (keys {', '.join(differ)}); "
                              f"use another --out")
        if saved["seeds"] == record["seeds"] and os.path.exists(os.path.join(vdir, "summary.csv")):
            log(f"{variant}: reusing {vdir}")
            return store.read_csv(os.path.join(vdir, "summary.csv"))
    store.make_dirs(vdir)
    for name in os.listdir(vdir):  # a sweep of other seeds: its files go, so none is mistaken for this one's
        if name.startswith("seed_") or name in ("summary.csv", "config.json"):
            os.remove(os.path.join(vdir, name))
    log(f"{variant}: training {len(seeds)} seeds x {int(config.total_steps)} steps in one program")
    result = sweep(config, seeds, progress=progress)
    rows = []
    for k, s in enumerate(result["seeds"]):
        store.write_csv(os.path.join(vdir, f"seed_{s}.csv"), SEED_COLUMNS, seed_rows(result, k))
        rows.append({"variant": variant, "seed": s, "n": result["n"],
                     **{c: int(result[c][k]) for c in COUNTS},
                     "final_loss": f"{float(result['final_loss'][k]):.6g}", "finite": int(result["finite"][k])})
    store.write_csv(os.path.join(vdir, "summary.csv"), SUMMARY_COLUMNS, rows)
    store.atomic_write_json(record_path, record)
    return rows


def distribution_rows(rows: list) -> list:
    """One row per variant and count: :func:`distribution` over the seeds."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        for count in COUNTS:
            d = distribution([int(r[count]) for r in mine])
            out.append({"variant": variant, "count": count, "seeds": d["n"], "n": int(mine[0]["n"]),
                        **{k: f"{d[k]:g}" for k in ("median", "q1", "q3", "min", "max")}})
    return out


def format_distribution(rows: list) -> str:
    lines = [f"{'variant':<10} {'count':<17} {'median':>7} {'q1':>7} {'q3':>7} {'min':>5} {'max':>5}   of"]
    for r in rows:
        lines.append(f"{r['variant']:<10} {r['count']:<17} {r['median']:>7} {r['q1']:>7} {r['q3']:>7} "
                     f"{r['min']:>5} {r['max']:>5}   {r['n']} points, {r['seeds']} seeds")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list:
    """``'16'`` -> 0..15; ``'5-20'`` -> 5..20; ``'0,3,7'`` -> those."""
    text = text.strip()
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        if "-" in text:
            lo, hi = text.split("-", 1)
            return list(range(int(lo), int(hi) + 1))
        return list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: use a count (16), a range (5-20) or a list (0,3,7)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pag_seed_sweep.py",
        description="Train many seeds of a small array-data config at once (the seeds vmapped into one "
                    "compiled program, each seed the computation `advalign-jax train --config.seed=S` runs on "
                    "one device), attack every model with the config's evaluation attack, and report the "
                    "distribution over seeds of the points kept: kept_adversarial (prediction at the "
                    "attacked point = label; the PAG paper's count) and kept_robust (also correct clean; "
                    "the trainer's eval_robust_accuracy).",
        epilog="Example: python scripts/pag_seed_sweep.py --config configs/pag_toy2d.py --variants vanilla,pag "
               "--seeds 16 --out results/pag_toy2d_seeds. Overrides --config.KEY=VALUE apply to every variant.")
    p.add_argument("--config", default="configs/pag_toy2d.py", help="config file (default: %(default)s)")
    p.add_argument("--variants", default="vanilla,pag", help="comma-separated config variants (default: %(default)s)")
    p.add_argument("--seeds", default="16", help="a count N (seeds 0..N-1), a range A-B or a list a,b,c "
                                                 "(default: %(default)s)")
    p.add_argument("--epochs", type=float, default=0.0,
                   help="train this many epochs (total_steps = epochs x steps_per_epoch); default: the config's")
    p.add_argument("--out", default="results/pag_toy2d_seeds", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_overrides(argv)
        args = build_parser().parse_args(rest)
        seeds = parse_seeds(args.seeds)
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        rows = []
        for variant in variants:
            config = load_config(f"{args.config}:{variant}", overrides)
            if args.epochs:
                config.total_steps = max(1, int(round(args.epochs * int(config.steps_per_epoch))))
            rows += run_variant(config, variant, seeds, args.out, progress=not args.no_progress)
        store.make_dirs(args.out)
        store.write_csv(os.path.join(args.out, "summary.csv"), SUMMARY_COLUMNS, rows)
        dist = distribution_rows(rows)
        store.write_csv(os.path.join(args.out, "distribution.csv"), DISTRIBUTION_COLUMNS, dist)
        print(format_distribution(dist))
        print(f"per-seed files: {os.path.join(args.out, 'VARIANT', 'seed_S.csv')}; summary.csv and distribution.csv "
              f"in {args.out}")
        return 0
    except AdvalignError as err:
        print(f"pag_seed_sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pag_seed_sweep: interrupted (finished variants are kept; rerun to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
