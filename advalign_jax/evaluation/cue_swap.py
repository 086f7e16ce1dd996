"""The cue-swap test on synthetic ClickMe data: who takes the shortcut, independently of any saliency.

Synthetic shards (:mod:`advalign_jax.data.synthetic`, written by ``advalign-jax data synth``) carry
their generator's settings in ``{prefix}.json`` beside them. Where every evaluated file is such a shard
and its spurious cue is the corner patch, the evaluations also classify two repainted copies of each
image, made by the generator itself with **only the patch colour changed**
(``make_example(i, spec, cue_class=k)``), encoded like the originals and read by a reader with the
evaluation's own settings, so that the copies go through exactly the preprocessing of the originals:

- ``swap``: the patch shows another class's colour, ``k = (y + 1 + (i // C) mod (C - 1)) mod C`` for
  generator index ``i``, label ``y``, ``C`` classes (never the label; every other class in turn);
- ``congruent``: the patch shows the label's own colour, ``k = y``.

A model that ignores the patch classifies all three versions alike; one that took the shortcut gains
on ``congruent`` and loses on ``swap``, where it tends to answer the painted class (the *follow rate*).
Before anything is used, one record is regenerated unchanged and compared with the stored one
(:func:`reproduces`: the same label and decoded pixels): shards the generator no longer reproduces get
no cue-swap test (with one line saying so).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable, Optional, Sequence

import numpy as np

from advalign_jax.data import records, synthetic
from advalign_jax.data.tf_env import import_tf
from advalign_jax.evaluation.summaries import with_interval

VARIANTS = ("swap", "congruent")
NO_CUE = -1  # the per-image cue columns of data without a patch cue
CUE_COLUMNS = ["cue_mass", "cue", "swap_cue", "swap_pred", "congruent_pred"]
CUE_SUMMARY_COLUMNS = ["cue_swap_accuracy", "cue_swap_accuracy_low", "cue_swap_accuracy_high",
                       "cue_congruent_accuracy", "cue_congruent_accuracy_low", "cue_congruent_accuracy_high",
                       "cue_follow_rate"]


def swap_class(index: int, label: int, num_classes: int) -> int:
    """The class painted into image ``index`` for the swap test (module docstring): never ``label``."""
    return int((label + 1 + (index // num_classes) % (num_classes - 1)) % num_classes)


@dataclasses.dataclass
class CueData:
    """The synthetic shards being evaluated, in the reader's record order."""

    files: list  # the reader's (sorted) file list
    specs: list  # SynthSpec per file
    encodings: list  # (encoding, jpeg_quality) per file
    generator_index: list  # per file: the generator index of each of its records
    cue: np.ndarray  # per record (record order): the class the stored cue shows
    swap: np.ndarray  # per record: the class painted by the swap test
    label: np.ndarray  # per record: the generator's label


def _metadata_for(path: str) -> Optional[dict]:
    """The ``data synth`` metadata that lists ``path`` among its shards, or None."""
    folder, name = os.path.split(path)
    try:
        candidates = sorted(f for f in os.listdir(folder or ".") if f.endswith(".json"))
    except OSError:
        return None
    for candidate in candidates:
        try:
            with open(os.path.join(folder, candidate)) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and name in meta.get("shards", ()) and isinstance(meta.get("config"), dict):
            return meta
    return None


def find(files: Sequence[str], num_classes: int) -> Optional[CueData]:
    """:class:`CueData` when every file of ``files`` (the reader's sorted list) is a synthetic shard
    with a patch cue and ``num_classes`` classes; else None."""

    specs, encodings, gen_index = [], [], []
    for path in files:
        meta = _metadata_for(path)
        if meta is None:
            return None
        c = meta["config"]
        try:
            if c.get("cue") != "patch" or int(c["num_classes"]) != num_classes:
                return None
            spec = synthetic.SynthSpec(num_classes=int(c["num_classes"]), size=int(c["size"]), seed=int(c["seed"]),
                                       cue="patch", spurious=float(c["spurious"]))
            shard = list(meta["shards"]).index(os.path.basename(path))
            num_shards, num_images = len(meta["shards"]), int(c["num_images"])
        except (KeyError, TypeError, ValueError):
            return None
        specs.append(spec)
        encodings.append((str(c.get("encoding", "jpeg")), int(c.get("jpeg_quality", 95))))
        gen_index.append(list(range(shard, num_images, num_shards)))  # the writer's round robin
    cue, swap, label = [], [], []
    for spec, indices in zip(specs, gen_index):
        for i in indices:
            y = i % spec.num_classes
            cue.append(synthetic.example_cue(i, spec))
            swap.append(swap_class(i, y, spec.num_classes))
            label.append(y)
    as_int = lambda v: np.asarray(v, np.int64)  # noqa: E731
    return CueData(list(files), specs, encodings, gen_index, as_int(cue), as_int(swap), as_int(label))


def _encode(spec, encoding, index: int, cue_class: Optional[int]) -> bytes:

    image, heatmap, label = synthetic.make_example(index, spec, cue_class=cue_class)
    return records.encode_example(image, heatmap, label, encoding[0], encoding[1])


def reproduces(stored: bytes, fresh: bytes, tolerance: float = 1.0) -> bool:
    """The regenerated record decodes to the stored one: the same label, and image and map within a mean
    absolute difference of ``tolerance`` grey levels (JPEG codec versions may round differently; the
    bytes themselves may differ where the decoded pixels do not)."""

    if stored == fresh:
        return True
    a, b = records.describe_record(stored, decode=True), records.describe_record(fresh, decode=True)
    if a.problem or b.problem or a.label != b.label or a.image.shape != b.image.shape:
        return False
    diff = lambda u, v: float(np.mean(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))  # noqa: E731
    return diff(a.image, b.image) < tolerance and diff(a.heatmap, b.heatmap) < tolerance


def write_variants(data: CueData, needed: np.ndarray, out_dir: str,
                   log: Callable[[str], None] = lambda m: None) -> Optional[dict]:
    """Writes the ``swap`` and ``congruent`` copies of the shards into ``out_dir/VARIANT/`` (the same
    files in the same order; records whose ``needed`` entry (record order) is false keep their stored
    bytes, as they will not be evaluated). Returns ``{variant: [files]}``, or None (with a line in
    ``log``) when the generator does not reproduce the stored records."""

    tf = import_tf()
    out = {v: [] for v in VARIANTS}
    writers = {}
    offset = 0
    checked = False
    try:
        for k, (path, spec, enc, indices) in enumerate(zip(data.files, data.specs, data.encodings,
                                                           data.generator_index)):
            name = f"{k:05d}-{os.path.basename(path)}"  # the reader sorts by name: the order is kept
            for v in VARIANTS:
                os.makedirs(os.path.join(out_dir, v), exist_ok=True)
                out[v].append(os.path.join(out_dir, v, name))
                writers[v] = tf.io.TFRecordWriter(out[v][-1])
            stored = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
            if len(stored) != len(indices):
                log(f"cue-swap test skipped: {path} holds {len(stored)} records, its metadata {len(indices)}")
                return None
            for j, (raw, i) in enumerate(zip(stored, indices)):
                r = offset + j
                if not needed[r]:
                    for v in VARIANTS:
                        writers[v].write(raw)
                    continue
                if not checked:
                    if not reproduces(raw, _encode(spec, enc, i, None)):
                        log(f"cue-swap test skipped: the synthetic generator does not reproduce record {j} of "
                            f"{path} (written by another version?)")
                        return None
                    checked = True
                writers["swap"].write(_encode(spec, enc, i, int(data.swap[r])))
                writers["congruent"].write(_encode(spec, enc, i, int(data.label[r])))
            for v in VARIANTS:
                writers.pop(v).close()
            offset += len(indices)
    finally:
        for w in writers.values():
            w.close()
    return out


class Variants:
    """The repainted copies of one run: written into a private temporary folder by every process
    (nothing goes to the workdir) and removed by :meth:`close`."""

    def __init__(self, data: CueData, needed: np.ndarray, log: Callable[[str], None]):
        self.data = data
        self.dir = tempfile.mkdtemp(prefix="advalign_cue_swap_")
        self.files = write_variants(data, needed, self.dir, log)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# The per-image columns and the summary of the test
# ----------------------------------------------------------------------------------------------------


def cue_fields(host: dict, meta: dict, k: int) -> dict:
    """The per-image cue columns (:data:`CUE_COLUMNS`: ``cue_mass``, the share of the explanation map inside the patch, :func:`advalign_jax.evaluation.metrics.region_fraction`; ``cue,swap_cue,swap_pred,congruent_pred``, ``-1`` where the data has no patch cue) of image ``k`` of a batch."""
    return {"cue_mass": float(host["cue_mass"][k]) if "cue_mass" in host else float("nan"),
            "cue": int(meta["cue"][k]), "swap_cue": int(meta["swap_cue"][k]),
            "swap_pred": int(host["pred_swap"][k]) if "pred_swap" in host else NO_CUE,
            "congruent_pred": int(host["pred_congruent"][k]) if "pred_congruent" in host else NO_CUE}


def cue_summary(rows: Sequence[dict], boot: dict) -> dict:
    """The cue-swap test of one model (:data:`CUE_SUMMARY_COLUMNS`) from its per-image rows: accuracy on
    the swapped copies and on the congruent ones (with their bootstrap intervals), and the share of
    swapped copies classified as the painted class; NaN without the test."""
    tested = [r for r in rows if int(r["swap_cue"]) >= 0]
    out = {}
    with_interval(out, "cue_swap_accuracy", [int(r["swap_pred"]) == int(r["label"]) for r in tested], boot)
    with_interval(out, "cue_congruent_accuracy", [int(r["congruent_pred"]) == int(r["label"]) for r in tested], boot)
    out["cue_follow_rate"] = (float(np.mean([int(r["swap_pred"]) == int(r["swap_cue"]) for r in tested]))
                              if tested else float("nan"))
    return out


def swap_correct(row: dict) -> float:
    """1 / 0: the swapped copy is classified correctly; NaN without the cue-swap test."""
    return float(int(row["swap_pred"]) == int(row["label"])) if int(row["swap_cue"]) >= 0 else float("nan")
