"""``advalign-jax data synth`` and ``advalign-jax data inspect``."""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from advalign_jax import store
from advalign_jax.config import load_config
from advalign_jax.data import inspect, records, synthetic, writer
from advalign_jax.errors import AdvalignError, ConfigError

DEFAULT_SYNTH_CONFIG = "configs/synthetic_clickme.py:train"


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="write synthetic ClickMe shards, inspect shards",
                          description="ClickMe data tools: synthetic shards and inspection.")
    data_sub = data.add_subparsers(title="data commands", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    synth = data_sub.add_parser(
        "synth", help="write synthetic ClickMe shards in either real encoding",
        description="Write synthetic ClickMe TFRecords (JPEG-256 harmonization shards or raw-float32 "
                    "224 records): one class-defining shape per image among distractors, its "
                    "silhouette as the human map, and an optional spurious cue (a corner patch or a "
                    "background tint) correlated with the label.",
        epilog="Example: advalign-jax data synth --config configs/synthetic_clickme.py:val "
               "--config.num_images=64 --out data/synth")
    synth.add_argument("--config", default=DEFAULT_SYNTH_CONFIG,
                       help=f"config FILE.py[:VARIANT] (default {DEFAULT_SYNTH_CONFIG}); "
                            "override fields with --config.KEY=VALUE")
    synth.add_argument("--out", required=True, help="output folder for {prefix}-{i}.tfrecords")
    synth.add_argument("--overwrite", action="store_true", help="replace shards that already exist")
    synth.set_defaults(func=run_synth)

    insp = data_sub.add_parser(
        "inspect", help="count, check and picture ClickMe shards",
        description="Read every record of the given TFRecord files (globs allowed), check it, print "
                    "the record count, encodings, shapes and label histogram, and write a PNG grid of "
                    "images with their preprocessed human maps.")
    insp.add_argument("files", nargs="+", metavar="FILES", help="TFRecord files or glob patterns")
    insp.add_argument("--out", default="clickme_inspect.png", help="PNG grid path (default %(default)s)")
    insp.add_argument("--num-classes", type=int, default=1000, help="labels must lie in [0, N) (default 1000)")
    insp.add_argument("--encoding", default="auto", choices=["auto", "jpeg", "raw_float32"],
                      help="expected encoding (default: detect per record)")
    insp.add_argument("--grid-size", type=int, default=16, help="images in the PNG grid (default 16)")
    insp.add_argument("--skip-bad-records", action="store_true", help="skip and count bad records")
    insp.add_argument("--json", dest="json_out", help="also write the report as JSON to this path")
    insp.set_defaults(func=run_inspect)


def run_synth(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.config_overrides)
    if config.encoding not in records.ENCODINGS:
        raise ConfigError(f"encoding must be one of {', '.join(records.ENCODINGS)}, got {config.encoding!r}")
    try:
        spec = synthetic.SynthSpec(num_classes=config.num_classes, size=config.size, seed=config.seed,
                                   cue=config.cue, spurious=config.spurious)
    except ValueError as err:
        raise ConfigError(f"{args.config}: {err}") from None

    def example(i: int) -> bytes:
        image, heatmap, label = synthetic.make_example(i, spec)
        return records.encode_example(image, heatmap, label, config.encoding, config.jpeg_quality)

    if "://" not in args.out:
        store.make_dirs(args.out)
    paths = writer.write_shards(args.out, config.prefix, config.num_shards, config.num_images, example,
                                overwrite=args.overwrite,
                                progress=lambda it: tqdm(it, desc="synth", unit="img", file=sys.stderr))
    meta = {"config": config.to_dict(), "shards": [os.path.basename(p) for p in paths],
            "classes": list(synthetic.SHAPES[:config.num_classes])}
    store.atomic_write_json(os.path.join(args.out, f"{config.prefix}.json"), meta)
    print(f"wrote {config.num_images} {config.encoding} records ({config.size}x{config.size}, "
          f"{config.num_classes} classes) to {len(paths)} shard(s) in {args.out}")
    for p in paths:
        print(f"  {p}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    if args.grid_size < 1:
        raise AdvalignError(f"--grid-size must be at least 1, got {args.grid_size}")
    report = inspect.inspect(args.files, args.out, num_classes=args.num_classes, encoding=args.encoding,
                             skip_bad_records=args.skip_bad_records, grid_size=args.grid_size)
    for line in report.lines():
        print(line)
    if report.num_records:
        print(f"grid: {args.out}")
    if args.json_out:
        payload = {"files": report.files, "records_per_file": report.records_per_file,
                   "num_records": report.num_records, "skipped": report.skipped,
                   "encodings": dict(report.encodings),
                   "image_shapes": {str(k): v for k, v in report.image_shapes.items()},
                   "heatmap_shapes": {str(k): v for k, v in report.heatmap_shapes.items()},
                   "labels": {str(k): v for k, v in sorted(report.labels.items())},
                   "zero_maps": report.zero_maps, "damaged": report.damaged}
        store.atomic_write_json(args.json_out, payload)
    return 0
