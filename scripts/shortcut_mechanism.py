"""Where the demonstration models' input-gradients and attacks sit on the shortcut patch, channel by
channel: the measurements behind the harmonizer question of docs/demonstration.md.

    python scripts/shortcut_mechanism.py [--models NAME=DIR,...] [--out DIR] [--eps 1.0]

For each model (default: the three embedded ones) on the 128 embedded validation images at 64 px, with
``g = d f_y / d x`` (N, H, W, 3) the true-class logit's input-gradient and ``P`` the patch square
(``advalign_jax.data.synthetic.cue_region``), each a share of a non-negative map's mass inside ``P``:

- ``mean_cut``: the training loss's saliency, ``standardize_cut(mean_c g)`` (what the harmonizer's
  loss compares with the human map, which is 0 on the patch);
- ``mean_negative``: the part that cut removes, ``relu(-(s - mean s) / std s)`` with ``s = mean_c g``;
- ``absmax``: ``max_c |g|`` (the evaluation saliency);
- ``abs_mean``: ``mean_c |g|``;
- ``channel_R/G/B``: ``|g_c|``;
- ``attack``: ``delta^2`` of an untargeted L2 PGD of radius ``--eps`` (20 steps of eps / 8, the
  ``robustness`` library's L2 steps);
- ``cancellation``: on the patch, ``sum |mean_c g| / sum mean_c |g|`` (1: the channels agree in sign;
  0: they cancel), and the same off the patch.

``patch_area`` is the patch's share of the pixels (the share of a uniform map). Each value is the mean
over images with its 95% bootstrap interval (``advalign_jax.evaluation.stats``). Writes
``OUT/mechanism.csv`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from advalign_jax.attacks.pgd import PGDConfig, pgd
from advalign_jax.data.synthetic import cue_region
from advalign_jax.evaluation.robust.job import load_data
from advalign_jax.evaluation.stats import mean_with_interval
from advalign_jax.losses.harmonization import standardize_cut
from advalign_jax.models import load_model

DEFAULT = "vanilla=checkpoints/small_cnn_vanilla,randomcue=checkpoints/small_cnn_randomcue,harmonized=checkpoints/small_cnn_harmonized"
MEASURES = ("mean_cut", "mean_negative", "absmax", "abs_mean", "channel_R", "channel_G", "channel_B", "attack",
            "cancellation_patch", "cancellation_elsewhere")


def share(m, mask):
    """Per image: the share of the non-negative map ``m`` (N, H, W) inside ``mask`` (H, W)."""
    total = jnp.sum(m, axis=(1, 2))
    return jnp.where(total > 0, jnp.sum(m * mask, axis=(1, 2)) / jnp.where(total > 0, total, 1.0), jnp.nan)


def measures(model, variables, x, y, eps: float, mask):
    logits_fn = model.logits_fn(variables)
    logits, vjp = jax.vjp(logits_fn, x)
    (g,) = vjp(jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype))
    s = jnp.mean(g, axis=-1)
    # what the cut removes: relu(-(s - mean) / std), i.e. standardize_cut(-s)
    out = {"mean_cut": share(standardize_cut(s), mask), "mean_negative": share(standardize_cut(-s), mask),
           "absmax": share(jnp.max(jnp.abs(g), axis=-1), mask), "abs_mean": share(jnp.mean(jnp.abs(g), axis=-1), mask)}
    for c, name in enumerate("RGB"):
        out[f"channel_{name}"] = share(jnp.abs(g[..., c]), mask)
    cfg = PGDConfig(norm="l2", steps=20, step_size=eps / 8, projection="renorm", random_start="none")
    x_adv, _ = pgd(logits_fn, x, y, eps, cfg)
    out["attack"] = share(jnp.sum((x_adv - x) ** 2, axis=-1), mask)
    agree, spread = jnp.abs(s), jnp.mean(jnp.abs(g), axis=-1)
    for name, m in (("cancellation_patch", mask), ("cancellation_elsewhere", 1.0 - mask)):
        out[name] = jnp.sum(agree * m, axis=(1, 2)) / jnp.sum(spread * m, axis=(1, 2))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT, help="comma-separated NAME=MODEL_DIR")
    p.add_argument("--out", default="results/shortcut_mechanism")
    p.add_argument("--eps", type=float, default=1.0, help="L2 radius of the attack")
    args = p.parse_args()
    rows = []
    for entry in args.models.split(","):
        name, _, path = entry.partition("=")
        model, variables = load_model(path)
        view = ml_collections.ConfigDict({"data": {"source": "embedded", "split": "validation", "data_dir": ""},
                                          "max_examples": 0})
        x, y = load_data(view, model)
        size = int(model.input_shape[0])
        rs, cs = cue_region(size)
        mask = np.zeros((size, size), np.float32)
        mask[rs, cs] = 1.0
        values = jax.jit(lambda v, a, b: measures(model, v, a, b, args.eps, jnp.asarray(mask)))(variables, x, y)
        row = {"model": name, "images": len(x), "patch_area": float(mask.mean())}
        for k in MEASURES:
            m, lo, hi = mean_with_interval(np.asarray(values[k]))
            row.update({k: m, f"{k}_low": lo, f"{k}_high": hi})
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mechanism.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| measure | " + " | ".join(r["model"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    print("| patch area | " + " | ".join(f"{100 * r['patch_area']:.2f}" for r in rows) + " |")
    for k in MEASURES:
        scale = 1.0 if k.startswith("cancellation") else 100.0
        print(f"| {k} | " + " | ".join(f"{scale * r[k]:.2f} [{scale * r[k + '_low']:.2f}, {scale * r[k + '_high']:.2f}]"
                                       for r in rows) + " |")
    print(f"results: {os.path.join(args.out, 'mechanism.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
