"""``advalign-jax targets``: precompute PAG target gradients for a dataset and store them.

Writes the reference layout (each image followed by its C target gradients) as ``.npz``/``.npy``, or
TFRecord shards for large sets (one record per image; :mod:`advalign_jax.data.target_files`). A
training config then reads them with ``objective.target_source='precomputed'`` and
``objective.targets_file=PATH`` (for shards: ``DIR/PREFIX-*.tfrecords``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import jax
import numpy as np
from tqdm import tqdm

from advalign_jax import parallel, store
from advalign_jax.data import target_files as F
from advalign_jax.data.images import load_arrays
from advalign_jax.errors import ConfigError, OutputError, output_error, writing
from advalign_jax.losses import pag_targets as T

METHODS = ("one_image", "class_mean", "nearest_neighbour")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "targets", help="precompute PAG target gradients (OI, CM, NN) for a dataset",
        description="Compute the target gradients g(x, c) = r(c) - x of every image of a dataset for every "
                    "class c (One Image, Class Mean, or Nearest Neighbour: the nearest other image of class c) "
                    "and store them in the reference layout, for training with "
                    "objective.target_source='precomputed'.",
        epilog="Examples: advalign-jax targets --source digits --method nearest_neighbour --out "
               "results/digits_nn.npz;  advalign-jax targets --source tfds:cifar10 --method nearest_neighbour "
               "--out results/c10_nn --shards 16  (TFRecords; an interrupted run resumes at the first "
               "missing shard)")
    p.add_argument("--source", required=True, help="tfds:NAME, digits, toy2d or synthetic")
    p.add_argument("--split", default="train", help="split to compute (default: train)")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--method", choices=METHODS, default="nearest_neighbour", help="target source")
    p.add_argument("--num-classes", type=int, default=0, help="C (default: 1 + the largest label)")
    p.add_argument("--nn-sample-size", type=int, default=0, help="NN: images per class searched (0: all)")
    p.add_argument("--class-mean-scale", type=float, default=0.0, help="CM: constant scale (0: automatic)")
    p.add_argument("--seed", type=int, default=0, help="OI's image choice and NN's sample set")
    p.add_argument("--out", required=True, help="FILE.npz / FILE.npy, or a directory for TFRecord shards")
    p.add_argument("--shards", type=int, default=0, help="write N TFRecord shards into --out (0: one array file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="run as one of several JAX processes (scripts/launch_local.sh adds it): with --shards, "
                        "process p writes shards p, p + P, ...; one array file is written by process 0")
    p.set_defaults(func=run_targets)


def compute_targets(method, images, labels, num_classes, *, seed=0, nn_sample_size=0, class_mean_scale=0.0,
                    progress=lambda it: it):
    """(N, C, *image_shape) float32 target gradients of every image (NumPy)."""
    if method == "nearest_neighbour":
        targets, _ = T.nearest_neighbour_targets_dataset(images, labels, num_classes, nn_sample_size or None,
                                                         seed=seed, progress=progress)
        return targets
    reps = _representatives(method, images, labels, num_classes, seed, class_mean_scale)
    return np.asarray(T.representative_targets(np.asarray(images, np.float32), reps), np.float32)


def _representatives(method, images, labels, num_classes, seed, class_mean_scale):
    if method == "one_image":
        return T.one_image_representatives(images, labels, num_classes, seed=seed)[0]
    return T.class_mean_representatives(images, labels, num_classes,
                                        scale=class_mean_scale if class_mean_scale else "auto")


def run_targets(args: argparse.Namespace) -> int:
    parallel.initialize_distributed(bool(args.distributed))
    me, count = jax.process_index(), jax.process_count()
    if args.shards <= 0 and os.path.splitext(args.out)[1] not in (".npz", ".npy"):
        raise ConfigError(f"--out {args.out}: name a .npz or .npy file, or pass --shards N for TFRecords")
    images, labels = load_arrays(args.source, args.split, args.data_dir, args.limit)
    num_classes = args.num_classes or int(np.max(labels)) + 1
    progress = (lambda it: it) if args.no_progress else (lambda it: tqdm(it, desc="targets", unit="batch"))
    kw = dict(seed=args.seed, nn_sample_size=args.nn_sample_size, class_mean_scale=args.class_mean_scale)
    if args.shards <= 0 and me != 0:  # one array file: process 0 computes and writes it
        written = [args.out]
    elif args.shards <= 0:
        if os.path.isdir(args.out):
            raise OutputError(f"cannot write {args.out}: it is a directory; name a .npz or .npy file")
        store.make_dirs(os.path.dirname(os.path.abspath(args.out)))
        targets = compute_targets(args.method, images, labels, num_classes, progress=progress, **kw)
        tmp = f"{args.out}.tmp-{os.getpid()}{os.path.splitext(args.out)[1]}"
        try:  # written beside, then renamed: a full disk leaves no half file
            F.save_targets(tmp, images, targets, labels)
            os.replace(tmp, args.out)
        except OSError as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise output_error(args.out, err) from None
        written = [args.out]
    else:
        # Shard s holds images s, s + S, s + 2S, ...; finished shards are kept, so a rerun resumes.
        store.make_dirs(args.out)
        meta = {"source": args.source, "split": args.split, "limit": args.limit, "method": args.method,
                "num_classes": num_classes, "shards": args.shards, **kw}
        meta_path = os.path.join(args.out, "targets.json")
        old = store.read_json(meta_path)
        if old is not None and old != meta:
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            raise ConfigError(f"{args.out} holds targets made with other settings ({', '.join(diff)}); "
                              f"choose another --out")
        if me == 0:
            store.atomic_write_json(meta_path, meta)
        written = []
        if args.method == "nearest_neighbour":  # the whole set is the sample set; shards only split queries
            bank = T.nearest_neighbour_bank(images, labels, num_classes, args.nn_sample_size or None, args.seed)
        else:
            reps = _representatives(args.method, images, labels, num_classes, args.seed, args.class_mean_scale)
        for s in progress(range(args.shards)):
            path = os.path.join(args.out, f"targets-{s}.tfrecords")
            written.append(path)
            if os.path.exists(path) or s % count != me:  # done, or another process's shard
                continue
            idx = np.arange(s, len(images), args.shards)
            if args.method == "nearest_neighbour":
                targets, _ = T.nearest_neighbour_targets_dataset(images, labels, num_classes, indices=idx, bank=bank)
            else:
                targets = np.asarray(T.representative_targets(images[idx], reps), np.float32)
            tmp_dir = os.path.join(args.out, f".shard-{s}")
            with writing(path):
                F.write_target_records(tmp_dir, "targets", images[idx], targets, labels[idx], idx, overwrite=True)
                os.replace(glob.glob(os.path.join(tmp_dir, "targets-*.tfrecords"))[0], path)
                os.rmdir(tmp_dir)
    parallel.sync("targets-written")
    if me == 0:
        print(json.dumps({"written": written, "images": int(len(images)), "num_classes": num_classes,
                          "method": args.method}, indent=1))
    return 0

