"""``advalign-jax construct`` (``configs/robust_features.py``): the datasets of Ilyas, Santurkar, Tsipras,
Engstrom, Tran, Madry, "Adversarial Examples Are Not Bugs, They Are Features" (NeurIPS 2019;
MadryLab/constructed-datasets), built from a trained model and a training set.

For each training image ``x`` with label ``y`` (``C`` classes):

- ``det``: target ``t = (y + 1) mod C``; ``x'`` the targeted L2 attack on a *standard* model towards
  ``t`` (CIFAR-10: eps 0.5, step 0.1, 100 steps); new label ``t`` (:func:`relabel`);
- ``rand``: ``t`` uniform over the ``C`` classes (``numpy.random.default_rng(seed).integers``); the same
  attack; new label ``t``;
- ``robust`` (D_R): ``x'`` matched to ``rep(x)`` of a *robust* model from a seed image, a random other
  training image (:func:`seed_images`: never the image itself), minimising
  ``||rep(x') - rep(x)|| / ||rep(x)||`` by the normalised L2 step (step 0.1, about 1000 steps, eps 1000:
  unconstrained but for the [0, 1] box); label ``y``;
- ``non_robust`` (D_NR): the same with a *standard* model.

The attack and the matching are the project's PGD with the ``robustness`` library's L2 semantics
(:mod:`advalign_jax.synthesis.ops`), the model in inference mode; every image goes through the
evaluation protocol (batches sharded over the devices, resumable batch by batch:
:mod:`advalign_jax.synthesis.items`). The result is ``workdir/dataset.npz`` (``image`` float32 NHWC,
``label`` int32 (the new label), ``source_label``, ``seed_index``, ``index``) with ``workdir/dataset.json``
(the recipe, the data source, the source model's path and fingerprint), written once every image is
done (:mod:`advalign_jax.data.constructed`); ``workdir/items.csv`` has one row per image (its final loss,
L2 change, and ``reached``: the attack's target class predicted, or the matching loss below the seed
image's own). The trainer reads it as
``arrays.source='constructed:WORKDIR'``: the training split is the constructed set, any other split the
original data's, so a model trained on it is evaluated on the **original** test set.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax import parallel, store
from advalign_jax.data.constructed import FORMAT
from advalign_jax.data.images import load_arrays
from advalign_jax.errors import ConfigError, DataError
from advalign_jax.evaluation.job import EvaluationJob, default_log
from advalign_jax.models import fingerprint, load_model
from advalign_jax.synthesis import ops
from advalign_jax.synthesis.items import assemble, l2_distance, run_items, save_arrays
from advalign_jax.synthesis.representation import representation

KINDS = ("det", "rand", "robust", "non_robust")
MATCHING = ("robust", "non_robust")  # the kinds built by representation matching (the others: the attack)
CHANGEABLE = ("workdir", "batch_size", "distributed", "num_devices")
ROW_COLUMNS = ("item", "source_label", "label", "seed_index", "loss", "l2_change", "reached")


def relabel(kind: str, labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """The new labels: ``det`` ``(y + 1) mod C``; ``rand`` uniform in ``[0, C)`` from
    ``default_rng(seed)``; ``robust``/``non_robust`` ``y``."""
    labels = np.asarray(labels, np.int64)
    if kind == "det":
        return ((labels + 1) % num_classes).astype(np.int32)
    if kind == "rand":
        return np.random.default_rng(seed).integers(0, num_classes, len(labels)).astype(np.int32)
    return labels.astype(np.int32)


def seed_images(n: int, seed: int) -> np.ndarray:
    """For each image ``i`` of ``n``, a uniformly random other image ``j != i``:
    ``j = (i + 1 + k) mod n`` with ``k`` uniform in ``[0, n - 2]``."""
    if n < 2:
        raise DataError("the robust and non-robust datasets need at least 2 training images (a seed image is "
                        "another image)")
    k = np.random.default_rng([seed, 1]).integers(0, n - 1, n)
    return ((np.arange(n) + 1 + k) % n).astype(np.int32)


def check_config(config) -> ops.Recipe:
    if config.kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {config.kind!r}")
    if not config.model:
        raise ConfigError("config.model is empty: give the source model's directory (a standard model for det, "
                          "rand and non_robust, a robust one for robust)")
    if int(config.batch_size) < 1:
        raise ConfigError(f"batch_size must be positive, got {config.batch_size}")
    name = "matching" if config.kind in MATCHING else "attack"
    block = config[name]
    try:
        return ops.Recipe(float(block.eps), float(block.step_size), int(block.steps), bool(block.use_best))
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None


def _load_training_set(config, model):
    d = config.data
    x, y = load_arrays(d.source, d.split, d.data_dir or None, int(d.limit) if int(d.limit) > 0 else None)
    if len(y) == 0:
        raise DataError(f"data.source={d.source!r} split {d.split!r} holds no examples")
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ConfigError(f"data.source={d.source!r} gives inputs of shape {tuple(x.shape[1:])} but the model "
                          f"takes {tuple(model.input_shape)}")
    classes = int(y.max()) + 1
    if classes != model.num_classes or int(y.min()) < 0:
        raise ConfigError(f"the model has {model.num_classes} classes but data.source={d.source!r} has labels in "
                          f"[{int(y.min())}, {int(y.max())}]")
    return x.astype(np.float32), y.astype(np.int32)


def _batch_fn(model, rep, rec: ops.Recipe, kind: str) -> Callable:
    if kind not in MATCHING:
        def fn(variables, inputs):
            x, logits = ops.generate(model.logits_fn(variables), inputs["x"], inputs["t"], rec)
            loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), inputs["t"][:, None], axis=1)[:, 0]
            return {"image": x, "loss": loss, "reached": jnp.argmax(logits, axis=1) == inputs["t"]}
    else:
        def fn(variables, inputs):
            r = lambda im: rep(variables, im)  # noqa: E731
            target = r(inputs["x"])
            x, loss = ops.match(r, target, inputs["seed"], rec)
            return {"image": x, "loss": loss, "reached": loss < ops.matching_loss(r(inputs["seed"]), target)}
    return jax.jit(fn)


def construct(config, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> dict:
    """Builds the dataset (the module docstring); returns its metadata (on every process)."""
    rec = check_config(config)
    kind = config.kind
    mesh = parallel.job_mesh(config)
    model, variables = load_model(config.model, dtype=config.dtype)
    options = {k: v for k, v in model.options.items() if k != "dtype"}
    entry = {"path": config.model, "fingerprint": fingerprint(model.name, options, variables)}
    x, y = _load_training_set(config, model)
    n = len(x)
    labels = relabel(kind, y, model.num_classes, int(config.seed))
    matching = kind in MATCHING
    seeds = seed_images(n, int(config.seed)) if matching else np.full(n, -1, np.int32)
    rep = representation(model, variables, config.matching.layer, bool(config.matching.fake_relu)) if matching else None
    items = {"x": x, "t": labels, "seed_index": seeds}
    gather = {"seed": (x, "seed_index")} if matching else {}  # the seed images looked up per batch
    with EvaluationJob(config, CHANGEABLE, log or default_log) as job:
        rows_path = job.path("items.csv")
        if job.writer:
            job.check(os.path.exists(rows_path), {"source": entry}, lambda _: os.path.exists(rows_path))

        def rows_fn(idx, host):
            change = l2_distance(host["image"], x[seeds[idx]] if matching else x[idx])
            return [{"item": int(i), "source_label": int(y[i]), "label": int(labels[i]), "seed_index": int(seeds[i]),
                     "loss": float(host["loss"][k]), "l2_change": float(change[k]),
                     "reached": int(bool(host["reached"][k]))} for k, i in enumerate(idx)]

        rows, computed = run_items(job, mesh, variables, items, _batch_fn(model, rep, rec, kind),
                                   ("x", "t", "item") + tuple(gather), ("image",), rows_fn, ROW_COLUMNS, rows_path,
                                   job.path("parts"), int(config.batch_size), "source", entry,
                                   desc=f"construct {kind}", progress=progress, gather=gather)
        meta = {"format": FORMAT, "kind": kind, "num_examples": n, "num_classes": model.num_classes,
                "image_shape": list(x.shape[1:]),
                "data": {"source": config.data.source, "split": config.data.split, "data_dir": config.data.data_dir,
                         "limit": int(config.data.limit)},
                "model": entry, "recipe": {"eps": rec.eps, "step_size": rec.step_size, "steps": rec.steps,
                                           "use_best": rec.use_best},
                "seed": int(config.seed)}
        if rep is not None:
            meta["recipe"].update({"layer": config.matching.layer, "fake_relu": bool(config.matching.fake_relu)})
        finished = job.writer and store.read_json(job.path("dataset.json"), None) == meta and os.path.exists(
            job.path("dataset.npz"))
        if job.writer and (computed or not finished):  # a finished set reopened is not rewritten
            image = assemble(job.path("parts"), n, ("image",))["image"]
            save_arrays(job.path("dataset.npz"), {"image": image.astype(np.float32), "label": labels,
                                                  "source_label": y, "seed_index": seeds,
                                                  "index": np.arange(n, dtype=np.int32)})
            store.atomic_write_json(job.path("dataset.json"), meta)
        if job.writer:
            values = list(rows.values())
            meta["loss_mean"] = float(np.mean([float(r["loss"]) for r in values]))
            meta["reached"] = float(np.mean([int(r["reached"]) for r in values]))
        return meta

