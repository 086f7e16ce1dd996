"""``data inspect``: what a set of ClickMe shards holds, checked record by record, and a PNG grid.

The scan runs the same in-graph parser as the reader (:func:`records.parse_example_tf`), so a file that
inspects cleanly reads cleanly.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from advalign_jax.data import reader as reader_lib
from advalign_jax.data import records, shards
from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import DataError


@dataclasses.dataclass
class ShardReport:
    files: list
    records_per_file: list
    num_records: int = 0
    encodings: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    image_shapes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    heatmap_shapes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    zero_maps: int = 0
    skipped: int = 0
    damaged: dict = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"files: {len(self.files)}"]
        for path, n in zip(self.files, self.records_per_file):
            out.append(f"  {path}: {n} records" + (f" ({self.damaged[path]})" if path in self.damaged else ""))
        out.append(f"records: {self.num_records} valid" + (f", {self.skipped} skipped" if self.skipped else ""))
        out.append("encoding: " + ", ".join(f"{k} ({v})" for k, v in sorted(self.encodings.items())))
        out.append("image shapes: " + ", ".join(f"{k} ({v})" for k, v in sorted(self.image_shapes.items())))
        out.append("heatmap shapes: " + ", ".join(f"{k} ({v})" for k, v in sorted(self.heatmap_shapes.items())))
        out.append(f"all-zero heatmaps: {self.zero_maps}")
        if self.labels:
            lo, hi = min(self.labels), max(self.labels)
            out.append(f"labels: {len(self.labels)} distinct in [{lo}, {hi}]")
            out.append("label histogram (label: count): " +
                       " ".join(f"{k}:{v}" for k, v in sorted(self.labels.items())))
        return out


def scan(files: Sequence[str], num_classes: int = 1000, encoding: str = "auto",
         skip_bad_records: bool = False, batch_size: int = 256) -> ShardReport:
    """Reads every record of ``files`` (patterns allowed) and tallies encodings, shapes and labels."""
    tf = import_tf()
    paths = shards.resolve_files(files, key="FILES")
    counts, damaged = [], {}
    for p in paths:
        n, problem = shards.count_records(p, skip_damaged=skip_bad_records)
        counts.append(n)
        if problem:
            damaged[p] = problem
    report = ShardReport(files=paths, records_per_file=counts, damaged=damaged)
    report.skipped = len(damaged)
    names = tf.constant(paths)

    def summarise(fid, rec, raw):
        ex = records.parse_example_tf(raw, num_classes, encoding)
        return {"file_id": fid, "record": rec, "status": ex["status"], "label": ex["label"],
                "image_is_jpeg": ex["image_is_jpeg"], "heatmap_is_jpeg": ex["heatmap_is_jpeg"],
                "image_hw": tf.shape(ex["image"])[:2], "heatmap_hw": tf.shape(ex["heatmap"])[:2],
                "zero_map": tf.reduce_all(tf.equal(ex["heatmap"], 0.0))}

    def read(fid):
        ds = tf.data.TFRecordDataset(tf.gather(names, fid))
        if skip_bad_records:
            ds = ds.ignore_errors()
        return ds.enumerate().map(lambda i, raw: (fid, i, raw))

    ds = tf.data.Dataset.from_tensor_slices(np.arange(len(paths), dtype=np.int32))
    ds = ds.interleave(read, cycle_length=1).map(summarise, num_parallel_calls=tf.data.AUTOTUNE)
    if skip_bad_records:
        ds = ds.ignore_errors()
    it = iter(ds.batch(batch_size).prefetch(2).as_numpy_iterator())
    seen = 0
    while True:
        try:
            b = next(it)
        except StopIteration:
            break
        except tf.errors.OpError as err:
            where = shards.locate_bad_record(paths, num_classes, encoding)
            raise DataError(where or err.message.splitlines()[0]) from None
        seen += len(b["status"])
        for k in range(len(b["status"])):
            status = int(b["status"][k])
            if status:
                if skip_bad_records:
                    report.skipped += 1
                    continue
                message = records.STATUS_MESSAGES[status]
                if status == 6:
                    message = (f"label {int(b['label'][k])} is outside the configured class range "
                               f"[0, {num_classes})")
                raise DataError(f"{paths[b['file_id'][k]]}: record {int(b['record'][k])}: {message}")
            report.num_records += 1
            enc_i = records.JPEG if b["image_is_jpeg"][k] else records.RAW
            enc_h = records.JPEG if b["heatmap_is_jpeg"][k] else records.RAW
            report.encodings[enc_i if enc_i == enc_h else f"image {enc_i}, heatmap {enc_h}"] += 1
            report.image_shapes[(*map(int, b["image_hw"][k]), 3)] += 1
            report.heatmap_shapes[(*map(int, b["heatmap_hw"][k]), 1)] += 1
            report.labels[int(b["label"][k])] += 1
            report.zero_maps += bool(b["zero_map"][k])
    report.skipped += sum(counts) - seen  # records TF could not decode (skip mode only)
    return report


def save_grid(files: Sequence[str], out_png: str, num: int = 16, num_classes: int = 1000,
              encoding: str = "auto", skip_bad_records: bool = False, columns: int = 8) -> str:
    """A PNG of the first ``num`` records after the reference preprocessing: images and their maps."""
    import matplotlib  # heavy import, needed only to draw the grid

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend (no display)

    cfg = reader_lib.ReaderConfig(files=tuple(files), batch_size=num, num_classes=num_classes,
                                  encoding=encoding, skip_bad_records=skip_bad_records)
    batch = next(iter(reader_lib.ClickMeReader(cfg, process_index=0, process_count=1)))
    n = int(batch["mask"].sum())
    columns = min(columns, max(n, 1))
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(2 * rows, columns, figsize=(2 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        r, c = 2 * (k // columns), k % columns
        axes[r, c].imshow(np.clip(batch["image"][k], 0, 1))
        axes[r, c].set_title(f"#{int(batch['index'][k])} label {int(batch['label'][k])}", fontsize=8)
        axes[r + 1, c].imshow(batch["image"][k].mean(-1), cmap="gray", vmin=0, vmax=1)
        axes[r + 1, c].imshow(batch["heatmap"][k], cmap="jet", alpha=0.55)
        axes[r + 1, c].set_title("human map", fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(out_png)}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def inspect(files: Sequence[str], out_png: Optional[str], num_classes: int = 1000, encoding: str = "auto",
            skip_bad_records: bool = False, grid_size: int = 16) -> ShardReport:
    report = scan(files, num_classes, encoding, skip_bad_records)
    if out_png and report.num_records:
        save_grid(files, out_png, min(grid_size, report.num_records), num_classes, encoding, skip_bad_records)
    return report
