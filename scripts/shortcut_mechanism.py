"""Where the demonstration models' input-gradients and attacks sit on the shortcut patch, channel by
channel: the measurements behind the harmonizer question of docs/demonstration.md.

    python scripts/shortcut_mechanism.py [--models NAME=DIR,...] [--out DIR] [--eps 1.0]

For each model (default: the three embedded ones) on the 128 embedded validation images at 64 px
(:mod:`advalign_jax.evaluation.shortcut` defines each measure), with ``g = d f_y / d x`` (N, H, W, 3)
the true-class logit's input-gradient and ``P`` the patch square
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
  0: they cancel), and the same off the patch;
- the cue-swap copies (``advalign_jax.evaluation.cue_swap``: the generator's own image with only the
  patch repainted in class ``k``'s colour, encoded and read like the original), with the margin
  ``m = f_y - f_k``: ``margin`` is ``m(x)``; ``swap_change`` the change ``m(x_swap) - m(x)`` the patch
  makes; ``swap_first_order`` what the input-gradient predicts for it, ``grad m(x) . (x_swap - x)``;
  ``swap_at_midpoint`` the change from ``x`` to ``(x + x_swap) / 2``; ``follows`` whether the copy is
  classified as ``k``. A patch effect the gradient at the image sees has ``swap_first_order`` close
  to ``swap_change``; one that is flat at the image and steep between colours has it close to 0;
- ``leverage_mean`` / ``_absmax`` / ``_mean_abs``: the share of the harmonizer's alignment term (with
  that channel reduction, the human maps as training reads them) that the patch's saliency accounts
  for: ``1 - align(s (1 - P)) / align(s)``.

``patch_area`` is the patch's share of the pixels (the share of a uniform map). Each value is the mean
over images with its 95% bootstrap interval (``advalign_jax.evaluation.stats``). Writes
``OUT/mechanism.csv`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.data import embedded_files
from advalign_jax.errors import AdvalignError
from advalign_jax.evaluation import shortcut
from advalign_jax.evaluation.stats import mean_with_interval
from advalign_jax.models import load_model

DEFAULT = "vanilla=checkpoints/small_cnn_vanilla,randomcue=checkpoints/small_cnn_randomcue,harmonized=checkpoints/small_cnn_harmonized"
MEASURES = shortcut.GRADIENT_MEASURES + shortcut.SWAP_MEASURES + shortcut.LEVERAGE_MEASURES


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT, help="comma-separated NAME=MODEL_DIR")
    p.add_argument("--out", default="results/shortcut_mechanism")
    p.add_argument("--eps", type=float, default=1.0, help="L2 radius of the attack")
    args = p.parse_args()
    rows = []
    tmp = tempfile.mkdtemp(prefix="shortcut_mechanism_")
    try:
        try:
            swap_files, painted = shortcut.embedded_swap_copies(tmp)
        except AdvalignError as e:
            raise SystemExit(f"error: {e}") from None
        for entry in args.models.split(","):
            name, _, path = entry.partition("=")
            model, variables = load_model(path)
            size = int(model.input_shape[0])
            mask = jnp.asarray(shortcut.patch_mask(size))
            # the images, labels and the maps as training reads them, in one pass over the shard
            x, y, maps = shortcut.read_records(embedded_files("val"), size, minmax_maps=True)
            x_swap, y_swap, _ = shortcut.read_records(swap_files, size)
            if not np.array_equal(y_swap, y):
                raise SystemExit("the cue-swap copies are not in the order of the embedded images")

            def all_measures(v, a, b, c, d, h):
                logits_fn = model.logits_fn(v)
                out = shortcut.gradient_measures(logits_fn, a, b, mask, args.eps)
                out.update(shortcut.swap_measures(logits_fn, a, c, b, d))
                out.update(shortcut.loss_leverage(shortcut.true_class_gradient(logits_fn, a, b), h, mask))
                return out

            values = jax.jit(all_measures)(variables, x, y, x_swap, jnp.asarray(painted, jnp.int32), maps)
            row = {"model": name, "images": len(x), "patch_area": float(np.mean(shortcut.patch_mask(size)))}
            for k in MEASURES:
                m, lo, hi = mean_with_interval(np.asarray(values[k]))
                row.update({k: m, f"{k}_low": lo, f"{k}_high": hi})
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mechanism.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| measure | " + " | ".join(r["model"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    print("| patch area | " + " | ".join(f"{100 * r['patch_area']:.2f}" for r in rows) + " |")
    for k in MEASURES:
        scale = 1.0 if k.startswith("cancellation") or k in shortcut.SWAP_MEASURES else 100.0
        print(f"| {k} | " + " | ".join(f"{scale * r[k]:.2f} [{scale * r[k + '_low']:.2f}, {scale * r[k + '_high']:.2f}]"
                                       for r in rows) + " |")
    print(f"results: {os.path.join(args.out, 'mechanism.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
