"""Robust accuracy of a classifier on in-memory images: clean, PGD, and AutoAttack's white-box part.

An evaluation is a list of attacks, each with a name and a radius:

- :class:`PGDAttack`: any :class:`~advalign_jax.attacks.pgd.PGDConfig` (Madry-lab conventions),
  untargeted, or targeted at class ``(y + 1) mod C`` (``target='next'``: the other class of a binary
  task, the PAG toy evaluation); :func:`pgd_attack` builds the usual evaluation (``steps`` steps of
  ``2.5 eps / steps``, best-loss iterate, no random start) and :data:`PAG_EPOCH_EVAL` the PAG
  official per-epoch check (untargeted L2, eps 0.5, 7 steps of ``1.5 eps / 7``, random start uniform
  in ``+-8/255`` per pixel, last iterate; ``../shared/spec/pag.md``; PAG's mean cross-entropy and our
  per-example one give the same normalised L2 step).
- :class:`APGDCascade`: APGD stages (:mod:`advalign_jax.attacks.apgd`) run as AutoAttack runs its
  attacks, each on the points still robust after the previous ones; :func:`autoattack_whitebox` is
  the white-box part of AutoAttack "standard": APGD-CE (100 iterations) then APGD-T (targeted DLR,
  9 targets x 100 iterations; ``min(9, C - 1)`` targets for C classes, at least 4 classes). **FAB-T and
  Square (the other two attacks of "standard") are not run**, so its robust accuracy is an upper
  bound on AutoAttack's. On models without gradient masking the two APGD stages flip nearly every
  point the full ensemble flips (Croce & Hein 2020); a model suspected of masking gradients needs the
  full ensemble.

Default radii are RobustBench's for CIFAR-sized images: L2 0.5, Linf 8/255 (:data:`ROBUSTBENCH_EPS`).

**What is reported** (AutoAttack's convention): an example is *robust* under an attack when the
model classifies it correctly both clean and at the attack's returned point (the prediction is
recomputed there, as AutoAttack's final check does); robust accuracy is the fraction of robust
examples, so it never exceeds the clean accuracy. ``adversarial_accuracy`` (correct at the returned
point whatever the clean prediction: the ``robustness`` library's and PAG's number) is reported too,
the robust accuracy after each stage of a cascade, and ``robust_to_all``: the fraction robust under
every attack of the list (the per-example worst case).

:func:`iter_batches` runs a list of attacks over a dataset in batches of a fixed size (the last one
padded, with a mask, so no example is dropped and one compiled function serves every batch),
optionally sharding each batch over a device mesh (:mod:`advalign_jax.parallel`);
:func:`evaluate_robustness` collects them and :func:`epoch_metrics` gives the trainer's per-epoch
numbers. Every random draw of an example comes from its dataset index (``fold_in``), and the model
must be in inference mode, so an example's result does not depend on its batch mates, the batch size
or the number of devices (up to floating-point summation order).

**The job** (:func:`evaluate`, ``advalign-jax evaluate-robust``, ``configs/robustness.py``): one model
directory, one dataset from :func:`advalign_jax.data.images.load_arrays`, the attacks of
``config.attacks``. Files in ``config.workdir``: ``per_example.csv`` (``img,label,clean_pred``, then
per attack ``NAME/pred``, ``NAME/robust`` (0/1), ``NAME/norm`` (perturbation norm in the attack's
norm) and for cascades ``NAME/stage`` (the stage that flipped the example, ``none`` if none), then
``robust_to_all``), written batch by batch; ``summary.csv`` (one row per attack, per cascade stage and
``all``: ``model,attack,stage,norm,eps,num_examples,clean_accuracy,robust_accuracy,
adversarial_accuracy,max_perturbation,wall_time_s``); ``config.json``. A rerun with the same
configuration resumes where the last one stopped (results do not depend on the batching, so a resumed
run gives the same files; ``max_examples`` is not part of the configuration a workdir is tied to,
so a run can be extended to more examples later).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax import parallel
from advalign_jax.attacks.apgd import APGDConfig, apgd
from advalign_jax.attacks.pgd import PGDConfig, pgd
from advalign_jax.errors import AdvalignError, ConfigError, DataError

ROBUSTBENCH_EPS = {"l2": 0.5, "linf": 8.0 / 255.0}
TARGETS = ("none", "next")


# ----------------------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PGDAttack:
    """PGD with ``config`` at radius ``eps``; ``target``: ``'none'`` (untargeted on the label) or
    ``'next'`` (targeted at class ``(y + 1) mod C``; ``config.targeted`` must say so)."""

    name: str
    eps: float
    config: PGDConfig
    target: str = "none"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ConfigError(f"attack {self.name!r}: target must be one of {TARGETS}, got {self.target!r}")
        if self.config.targeted != (self.target == "next"):
            raise ConfigError(f"attack {self.name!r}: target={self.target!r} needs PGDConfig(targeted="
                              f"{self.target == 'next'})")

    @property
    def norm(self) -> str:
        return self.config.norm


@dataclasses.dataclass(frozen=True)
class APGDCascade:
    """APGD stages ``((stage_name, APGDConfig), ...)`` at radius ``eps``, each on the points still
    robust after the previous ones (all stages share one norm)."""

    name: str
    eps: float
    stages: tuple

    def __post_init__(self):
        if not self.stages:
            raise ConfigError(f"attack {self.name!r}: an APGD cascade needs at least one stage")
        norms = {cfg.norm for _, cfg in self.stages}
        if len(norms) != 1:
            raise ConfigError(f"attack {self.name!r}: the stages mix norms {sorted(norms)}")

    @property
    def norm(self) -> str:
        return self.stages[0][1].norm


Attack = Union[PGDAttack, APGDCascade]


def _radius(norm: str, eps: Optional[float]) -> float:
    if norm not in ROBUSTBENCH_EPS:
        raise ConfigError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return ROBUSTBENCH_EPS[norm] if eps is None else float(eps)


def _clip(clip) -> Optional[tuple]:
    return None if clip is None or len(clip) == 0 else tuple(float(v) for v in clip)


def pgd_attack(norm: str, eps: Optional[float] = None, steps: int = 20, step_factor: float = 2.5,
               random_start: bool = False, use_best: bool = True, clip=(0.0, 1.0),
               name: Optional[str] = None) -> PGDAttack:
    """The ``robustness`` library's evaluation PGD: ``steps`` steps of ``step_factor * eps / steps``,
    the best-loss iterate, random start (sphere for L2, box for Linf) only if asked."""
    eps = _radius(norm, eps)
    start = ("sphere" if norm == "l2" else "box") if random_start else "none"
    try:
        cfg = PGDConfig(norm=norm, steps=int(steps), step_size=float(step_factor) / int(steps), relative_step=True,
                        random_start=start, use_best=bool(use_best), clip=_clip(clip))
    except (ValueError, ZeroDivisionError) as err:
        raise ConfigError(f"pgd: {err}") from None
    return PGDAttack(name or f"pgd{steps}-{norm}", eps, cfg)


def autoattack_whitebox(norm: str, eps: Optional[float] = None, n_iter: int = 100, n_target_classes: int = 9,
                        n_restarts: int = 1, clip=(0.0, 1.0), stages=("apgd-ce", "apgd-t"),
                        name: Optional[str] = None) -> APGDCascade:
    """APGD-CE then APGD-T (targeted DLR, ``n_target_classes`` targets), AutoAttack "standard"'s
    white-box part (its FAB-T and Square are not included); ``stages`` picks a part of it."""
    eps = _radius(norm, eps)
    try:
        made = {"apgd-ce": APGDConfig(norm=norm, n_iter=int(n_iter), n_restarts=int(n_restarts), loss="ce",
                                      clip=_clip(clip)),
                "apgd-t": APGDConfig(norm=norm, n_iter=int(n_iter), n_restarts=int(n_restarts), loss="dlr-targeted",
                                     n_target_classes=int(n_target_classes), clip=_clip(clip))}
    except ValueError as err:
        raise ConfigError(f"apgd: {err}") from None
    return APGDCascade(name or f"apgd-ce+t-{norm}", eps, tuple((s, made[s]) for s in stages))


# PAG's official per-epoch robustness check.
PAG_EPOCH_EVAL = PGDAttack("pag-pgd7-l2", 0.5, PGDConfig(norm="l2", steps=7, step_size=1.5 * 0.5 / 7,
                                                        random_start="box", start_radius=8.0 / 255.0))


def default_attacks() -> list:
    """PGD-20 under L2 and Linf, then APGD-CE + APGD-T under L2 and Linf, at RobustBench's radii."""
    return [pgd_attack("l2"), pgd_attack("linf"), autoattack_whitebox("l2"), autoattack_whitebox("linf")]


ATTACK_KINDS = {"pgd": None, "apgd": ("apgd-ce", "apgd-t"), "apgd-ce": ("apgd-ce",), "apgd-t": ("apgd-t",)}


def attacks_from_config(c) -> tuple:
    """The attacks of ``c.attacks``, each ``KIND-NORM`` (KIND: ``pgd``, ``apgd`` (APGD-CE then
    APGD-T), ``apgd-ce``, ``apgd-t``; NORM: ``l2``, ``linf``), at radii ``c.eps.l2`` / ``c.eps.linf``
    with the budgets of the ``pgd`` and ``apgd`` blocks; the attack's name is the string itself."""
    specs = (c.attacks,) if isinstance(c.attacks, str) else tuple(c.attacks)
    if not specs:
        raise ConfigError("config.attacks is empty: name at least one attack (e.g. 'apgd-linf')")
    attacks = []
    for spec in specs:
        kind, _, norm = str(spec).rpartition("-")
        if kind not in ATTACK_KINDS or norm not in ROBUSTBENCH_EPS:
            raise ConfigError(f"config.attacks: unknown attack {spec!r}; use KIND-NORM with KIND in "
                              f"{', '.join(ATTACK_KINDS)} and NORM l2 or linf (e.g. 'apgd-linf')")
        eps = float(c.eps[norm])
        if kind == "pgd":
            attacks.append(pgd_attack(norm, eps, steps=c.pgd.steps, step_factor=c.pgd.step_factor,
                                      random_start=c.pgd.random_start, use_best=c.pgd.use_best, clip=c.clip,
                                      name=spec))
        else:
            attacks.append(autoattack_whitebox(norm, eps, n_iter=c.apgd.n_iter,
                                               n_target_classes=c.apgd.n_target_classes, n_restarts=c.apgd.n_restarts,
                                               clip=c.clip, stages=ATTACK_KINDS[kind], name=spec))
    return _check_attacks(attacks)


def _check_attacks(attacks: Sequence[Attack]) -> tuple:
    attacks = tuple(attacks)
    names = [a.name for a in attacks]
    for a in attacks:
        if not isinstance(a, (PGDAttack, APGDCascade)):
            raise ConfigError(f"unknown attack {a!r}: use PGDAttack or APGDCascade")
        if not a.name or "/" in a.name or "," in a.name or a.name == "all":
            raise ConfigError(f"attack name {a.name!r} must be non-empty, not 'all', and contain no '/' or ','")
        if not a.eps > 0:
            raise ConfigError(f"attack {a.name!r}: eps must be positive, got {a.eps}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two attacks are named {dup[0]!r}; results are filed by name")
    return attacks


def _fit_to_classes(cfg: APGDConfig, num_classes: int, name: str) -> APGDConfig:
    """APGD-T on C classes: ``min(n_target_classes, C - 1)`` targets; the DLR losses need 3 (4) classes."""
    if cfg.loss == "dlr" and num_classes < 3:
        raise ConfigError(f"attack {name!r}: the DLR loss needs at least 3 classes, the model has {num_classes}")
    if not cfg.targeted:
        return cfg
    if num_classes < 4:
        raise ConfigError(f"attack {name!r}: APGD-T (targeted DLR) needs at least 4 classes, the model has "
                          f"{num_classes}; use apgd-ce or pgd")
    return dataclasses.replace(cfg, n_target_classes=min(cfg.n_target_classes, num_classes - 1))


# ----------------------------------------------------------------------------------------------------
# One batch
# ----------------------------------------------------------------------------------------------------


def _attack_key(key, name: str):
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _norm_of(d, norm: str):
    flat = d.reshape(d.shape[0], -1)
    return jnp.max(jnp.abs(flat), axis=1) if norm == "linf" else jnp.sqrt(jnp.sum(flat * flat, axis=1))


def _run_pgd(f, x, y, attack: PGDAttack, key, index, num_classes: int):
    cfg = attack.config
    goal = (y + 1) % num_classes if attack.target == "next" else y
    if cfg.random_start == "none" and cfg.restarts == 1:
        return pgd(f, x, goal, attack.eps, cfg)[0]
    # per-example draws from the dataset index: independent of the batch (pgd draws per batch)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)

    def one(xi, gi, ki):
        return pgd(f, xi[None], gi[None], attack.eps, cfg, key=ki)[0][0]

    return jax.vmap(one)(x, goal, keys)


def batch_outputs(apply_fn: Callable, variables, x, y, index, mask, key, attacks: Sequence[Attack],
                  keep_adversarial: bool = False) -> dict:
    """Per-example results of every attack on one batch (traceable; :func:`make_batch_fn` jits it).

    Keys: ``clean_pred``; per attack ``NAME/pred`` (prediction at the returned point), ``NAME/norm``
    (perturbation norm in the attack's norm); per cascade ``NAME/stage`` (the stage that flipped the
    example, -1 if none); with ``keep_adversarial`` ``NAME/x_adv``."""
    def f(z):
        return apply_fn(variables, z)

    clean_logits = f(x)
    num_classes = clean_logits.shape[-1]
    clean_pred = jnp.argmax(clean_logits, axis=1)
    clean_ok = clean_pred == y
    out = {"clean_pred": clean_pred}
    for attack in attacks:
        k = _attack_key(key, attack.name)
        if isinstance(attack, PGDAttack):
            x_adv = _run_pgd(f, x, y, attack, k, index, num_classes)
        else:
            robust = jnp.logical_and(clean_ok, mask)
            x_adv = x
            stage = jnp.full(y.shape, -1, jnp.int32)
            for s, (_, cfg) in enumerate(attack.stages):
                cfg = _fit_to_classes(cfg, num_classes, attack.name)
                xs, ok = apgd(f, x, y, attack.eps, cfg, key=jax.random.fold_in(k, s), index=index, mask=robust)
                flipped = jnp.logical_and(robust, ok)
                x_adv = jnp.where(flipped.reshape((-1,) + (1,) * (x.ndim - 1)), xs, x_adv)
                stage = jnp.where(flipped, s, stage)
                robust = jnp.logical_and(robust, jnp.logical_not(ok))
            out[f"{attack.name}/stage"] = stage
        out[f"{attack.name}/pred"] = jnp.argmax(f(x_adv), axis=1)
        out[f"{attack.name}/norm"] = _norm_of(x_adv - x, attack.norm)
        if keep_adversarial:
            out[f"{attack.name}/x_adv"] = x_adv
    return out


@functools.lru_cache(maxsize=32)
def make_batch_fn(apply_fn: Callable, attacks: tuple, keep_adversarial: bool = False) -> Callable:
    """``jit((variables, x, y, index, mask, key) -> dict)`` of :func:`batch_outputs` (cached: the
    per-epoch evaluation compiles once)."""
    attacks = _check_attacks(attacks)
    return jax.jit(lambda v, x, y, i, m, k: batch_outputs(apply_fn, v, x, y, i, m, k, attacks, keep_adversarial))


def _records(host: dict, labels, attacks: Sequence[Attack]) -> dict:
    """Host outputs of real examples -> records with the robustness flags (module docstring)."""
    rec = dict(host)
    rec["label"] = labels
    rec["clean_correct"] = host["clean_pred"] == labels
    every = rec["clean_correct"].copy()
    for a in attacks:
        rec[f"{a.name}/robust"] = rec["clean_correct"] & (host[f"{a.name}/pred"] == labels)
        every &= rec[f"{a.name}/robust"]
    rec["robust_to_all"] = every
    return rec


# ----------------------------------------------------------------------------------------------------
# A dataset
# ----------------------------------------------------------------------------------------------------


def iter_batches(apply_fn: Callable, variables: Any, images, labels, attacks: Sequence[Attack],
                 batch_size: int = 256, key=None, mesh=None, keep_adversarial: bool = False,
                 skip: Optional[Callable] = None) -> Iterator[tuple]:
    """Yields ``(index, records)`` for each batch: ``index`` the dataset positions of its examples,
    ``records`` host arrays over them (``clean_pred``, ``label``, ``clean_correct``, ``NAME/pred``,
    ``NAME/robust``, ``NAME/norm``, ``NAME/stage`` for cascades, ``NAME/x_adv`` if kept,
    ``robust_to_all``).

    ``apply_fn(variables, x) -> logits`` in inference mode (``model.apply``); images NHWC (or any
    (N, ...) inputs); ``key`` the PRNG key of all random starts (default ``PRNGKey(0)``); ``mesh``: a
    :func:`~advalign_jax.parallel.make_mesh` mesh to shard each batch over (the batch size is rounded
    up to a multiple of its data-parallel size; every process passes the full dataset and computes its
    slice of each batch); ``skip(index) -> bool``: batches not to compute (resume; decided the same on
    every process).
    """
    attacks = _check_attacks(attacks)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim < 2 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"images {images.shape} and labels {labels.shape} must hold the same number of examples")
    n = images.shape[0]
    if n == 0:
        raise DataError("no examples to evaluate")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    labels = labels.astype(np.int32)
    images = images.astype(np.float32) if images.dtype != np.float32 else images
    procs, pid = jax.process_count(), jax.process_index()
    if mesh is None and procs > 1:
        raise ConfigError("a multi-process evaluation needs a mesh")
    unit = math.lcm(parallel.data_parallel_size(mesh), procs) if mesh is not None else 1
    batch_size = math.ceil(min(batch_size, n) / unit) * unit  # no larger than the data needs
    if mesh is not None:
        variables = parallel.replicate(variables, mesh)
    per_process = batch_size // procs
    key = jax.random.PRNGKey(0) if key is None else key
    fn = make_batch_fn(apply_fn, attacks, keep_adversarial)
    for b in range(math.ceil(n / batch_size)):
        index = np.arange(b * batch_size, min((b + 1) * batch_size, n))
        if skip is not None and parallel.all_processes(skip(index)):
            continue
        local = np.arange(b * batch_size, (b + 1) * batch_size)[pid * per_process:(pid + 1) * per_process]
        batch = {"x": images[np.minimum(local, n - 1)], "y": labels[np.minimum(local, n - 1)],
                 "index": local.astype(np.int32), "mask": local < n}
        if mesh is not None:
            batch = parallel.shard_batch(batch, mesh)
        out = fn(variables, batch["x"], batch["y"], batch["index"], batch["mask"], key)
        host = parallel.to_host(out) if mesh is not None else jax.tree.map(np.asarray, out)
        host = {k: v[:len(index)] for k, v in host.items()}
        yield index, _records(host, labels[index], attacks)


@dataclasses.dataclass
class RobustnessResult:
    """``summary`` (:func:`summarise`) and ``per_example``: arrays over the dataset (``index`` and
    the records of :func:`iter_batches`)."""

    summary: dict
    per_example: dict

    def format(self) -> str:
        lines = [f"{'attack':<24} {'norm':<5} {'eps':>8} {'robust acc':>11}",
                 f"{'clean':<24} {'':<5} {'':>8} {100 * self.summary['clean_accuracy']:>10.2f}%"]
        for name, s in self.summary["attacks"].items():
            lines.append(f"{name:<24} {s['norm']:<5} {s['eps']:>8.4f} {100 * s['robust_accuracy']:>10.2f}%")
            for stage, acc in s.get("after_stage", {}).items():
                lines.append(f"  after {stage:<16} {'':<5} {'':>8} {100 * acc:>10.2f}%")
        lines.append(f"{'all (worst case)':<24} {'':<5} {'':>8} {100 * self.summary['robust_to_all']:>10.2f}%")
        return "\n".join(lines)


def summarise(per_example: dict, attacks: Sequence[Attack]) -> dict:
    """``n``, ``clean_accuracy``, ``robust_to_all`` and per attack (``attacks``) a dict:
    ``robust_accuracy``, ``adversarial_accuracy``, ``norm``, ``eps``, ``max_perturbation``, and for
    cascades ``after_stage``: the robust accuracy after each stage."""
    n = len(per_example["label"])

    def mean(a):
        return float(np.mean(a)) if n else float("nan")

    summary = {"n": n, "clean_accuracy": mean(per_example["clean_correct"]),
               "robust_to_all": mean(per_example["robust_to_all"]), "attacks": {}}
    for a in attacks:
        s = {"robust_accuracy": mean(per_example[f"{a.name}/robust"]),
             "adversarial_accuracy": mean(per_example[f"{a.name}/pred"] == per_example["label"]),
             "norm": a.norm, "eps": float(a.eps),
             "max_perturbation": float(np.max(per_example[f"{a.name}/norm"])) if n else 0.0}
        if isinstance(a, APGDCascade):
            stage = per_example[f"{a.name}/stage"]
            ok = np.asarray(per_example["clean_correct"], bool).copy()
            s["after_stage"] = {}
            for j, (stage_name, _) in enumerate(a.stages):
                ok &= stage != j
                s["after_stage"][stage_name] = mean(ok)
        summary["attacks"][a.name] = s
    return summary


def evaluate_robustness(apply_fn: Callable, variables: Any, images, labels, attacks: Optional[Sequence[Attack]] = None,
                        batch_size: int = 256, key=None, mesh=None, keep_adversarial: bool = False,
                        progress: bool = False) -> RobustnessResult:
    """Runs ``attacks`` (default :func:`default_attacks`) on every example (see :func:`iter_batches`);
    returns a :class:`RobustnessResult`."""
    attacks = _check_attacks(default_attacks() if attacks is None else attacks)
    chunks = []
    total = math.ceil(len(labels) / max(batch_size, 1))
    for b, (index, rec) in enumerate(iter_batches(apply_fn, variables, images, labels, attacks, batch_size, key,
                                                  mesh, keep_adversarial)):
        chunks.append(rec)
        if progress:
            print(f"robustness: batch {b + 1}/{total}", file=sys.stderr)
    per_example = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    per_example["index"] = np.arange(len(per_example["label"]))
    return RobustnessResult(summarise(per_example, attacks), per_example)


def clean_accuracy(apply_fn: Callable, variables: Any, images, labels, batch_size: int = 256, mesh=None) -> float:
    """Top-1 accuracy on ``images`` (batched; the same loop with no attack)."""
    return evaluate_robustness(apply_fn, variables, images, labels, attacks=(), batch_size=batch_size,
                               mesh=mesh).summary["clean_accuracy"]


def epoch_metrics(apply_fn: Callable, variables: Any, images, labels, attacks: Sequence[Attack] = (PAG_EPOCH_EVAL,),
                  mesh=None, batch_size: int = 256, key=None) -> dict:
    """The trainer's per-epoch numbers on a held-out array set: ``eval_accuracy`` (clean),
    ``eval_robust_accuracy`` (robust under every attack, AutoAttack's convention) and, with several
    attacks, ``eval_robust_accuracy/NAME`` for each. The compiled batch function is cached, so calling
    this every epoch compiles once."""
    result = evaluate_robustness(apply_fn, variables, images, labels, attacks, batch_size=batch_size, key=key,
                                 mesh=mesh)
    s = result.summary
    out = {"eval_accuracy": s["clean_accuracy"], "eval_robust_accuracy": s["robust_to_all"]}
    if len(s["attacks"]) > 1:
        out.update({f"eval_robust_accuracy/{name}": a["robust_accuracy"] for name, a in s["attacks"].items()})
    return out


# ----------------------------------------------------------------------------------------------------
# The job: advalign-jax evaluate-robust
# ----------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["model", "attack", "stage", "norm", "eps", "num_examples", "clean_accuracy", "robust_accuracy",
                   "adversarial_accuracy", "max_perturbation", "wall_time_s"]
# Config keys whose values decide the results (a resumed run must agree on them).
RESULT_KEYS = ("model_dir", "arch", "data", "attacks", "eps", "pgd", "apgd", "clip", "dtype", "seed")


def per_example_columns(attacks: Sequence[Attack]) -> list:
    cols = ["img", "label", "clean_pred"]
    for a in attacks:
        cols += [f"{a.name}/pred", f"{a.name}/robust", f"{a.name}/norm"]
        if isinstance(a, APGDCascade):
            cols.append(f"{a.name}/stage")
    return cols + ["robust_to_all"]


def _csv_rows(index, rec: dict, attacks: Sequence[Attack]) -> list:
    rows = []
    for k, img in enumerate(index):
        row = {"img": int(img), "label": int(rec["label"][k]), "clean_pred": int(rec["clean_pred"][k]),
               "robust_to_all": int(rec["robust_to_all"][k])}
        for a in attacks:
            row[f"{a.name}/pred"] = int(rec[f"{a.name}/pred"][k])
            row[f"{a.name}/robust"] = int(rec[f"{a.name}/robust"][k])
            row[f"{a.name}/norm"] = float(rec[f"{a.name}/norm"][k])
            if isinstance(a, APGDCascade):
                s = int(rec[f"{a.name}/stage"][k])
                row[f"{a.name}/stage"] = a.stages[s][0] if s >= 0 else "none"
        rows.append(row)
    return rows


def _arrays_from_csv(rows: Sequence[dict], attacks: Sequence[Attack]) -> dict:
    """Per-example CSV rows (strings) -> the arrays :func:`summarise` takes."""
    def col(key, kind):
        return np.array([kind(r[key]) for r in rows], dtype=kind)

    out = {"label": col("label", int), "clean_pred": col("clean_pred", int),
           "robust_to_all": col("robust_to_all", int).astype(bool)}
    out["clean_correct"] = out["clean_pred"] == out["label"]
    for a in attacks:
        out[f"{a.name}/pred"] = col(f"{a.name}/pred", int)
        out[f"{a.name}/robust"] = col(f"{a.name}/robust", int).astype(bool)
        out[f"{a.name}/norm"] = col(f"{a.name}/norm", float)
        if isinstance(a, APGDCascade):
            names = [s for s, _ in a.stages]
            out[f"{a.name}/stage"] = np.array([names.index(r[f"{a.name}/stage"]) if r[f"{a.name}/stage"] != "none"
                                               else -1 for r in rows], int)
    return out


def summary_rows(model: str, summary: dict, seconds: float) -> list:
    """The rows of ``summary.csv`` (module docstring) from :func:`summarise`'s dict."""
    nan = float("nan")
    base = {"model": model, "num_examples": summary["n"], "clean_accuracy": summary["clean_accuracy"],
            "wall_time_s": round(seconds, 3)}
    rows = []
    for name, s in summary["attacks"].items():
        rows.append({**base, "attack": name, "stage": "", "norm": s["norm"], "eps": s["eps"],
                     "robust_accuracy": s["robust_accuracy"], "adversarial_accuracy": s["adversarial_accuracy"],
                     "max_perturbation": s["max_perturbation"]})
        for stage, acc in s.get("after_stage", {}).items():
            rows.append({**base, "attack": name, "stage": stage, "norm": s["norm"], "eps": s["eps"],
                         "robust_accuracy": acc, "adversarial_accuracy": nan, "max_perturbation": nan})
    rows.append({**base, "attack": "all", "stage": "", "norm": "", "eps": nan,
                 "robust_accuracy": summary["robust_to_all"], "adversarial_accuracy": nan, "max_perturbation": nan})
    return rows


_MODELS: dict = {}


def _shared(model):
    """One Model object per architecture (equal flax modules), so that :func:`make_batch_fn`'s cached
    compiled function serves every run of a process with the same architecture and batch shape."""
    try:
        return _MODELS.setdefault(model.module, model)
    except TypeError:  # an unhashable module: nothing shared
        return model


def load_data(config, model) -> tuple:
    """The configured arrays, checked against the model (input shape, label range)."""
    from advalign_jax.data.images import load_arrays  # pylint: disable=import-outside-toplevel

    d = config.data
    limit = int(config.max_examples) if config.max_examples > 0 else None
    x, y = load_arrays(d.source, d.split, d.data_dir or None, limit)
    if len(y) == 0:
        raise DataError(f"data.source={d.source!r} split {d.split!r} holds no examples")
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ConfigError(f"data.source={d.source!r} gives inputs of shape {tuple(x.shape[1:])} but the model "
                          f"takes {tuple(model.input_shape)}")
    if int(y.max()) >= model.num_classes or int(y.min()) < 0:
        raise DataError(f"data.source={d.source!r} has labels in [{int(y.min())}, {int(y.max())}] but the model "
                        f"has {model.num_classes} classes")
    return x, y


def evaluate(config, progress: bool = True) -> list:
    """Runs the job of the module docstring; returns the summary rows (every process computes,
    process 0 writes)."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    from advalign_jax.evaluation.results import (  # pylint: disable=import-outside-toplevel
        PerImageFile, check_workdir, fmt, write_csv)
    from advalign_jax.models import load_model  # pylint: disable=import-outside-toplevel

    parallel.initialize_distributed(bool(config.distributed))
    attacks = attacks_from_config(config)  # config mistakes before anything is loaded
    if int(config.batch_size) < 1:
        raise ConfigError(f"batch_size must be positive, got {config.batch_size}")
    if not config.model_dir:
        raise ConfigError("config.model_dir is empty: give a model directory (from `advalign-jax train` or "
                          "`advalign-jax convert`), e.g. --config.model_dir=checkpoints/MODEL")
    model, variables = load_model(config.model_dir, arch=config.arch or None, dtype=config.dtype)
    for a in attacks:  # loss / class-count mismatches before anything is written
        for _, cfg in getattr(a, "stages", ()):
            _fit_to_classes(cfg, model.num_classes, a.name)
    x, y = load_data(config, model)
    mesh = parallel.make_mesh(devices=jax.devices()[:config.num_devices] if config.num_devices else None)
    writer = jax.process_index() == 0
    workdir = config.workdir
    if writer:
        check_workdir(workdir, config, RESULT_KEYS)
    per_example = PerImageFile(os.path.join(workdir, "per_example.csv"), per_example_columns(attacks))
    done = dict(per_example.rows)
    timing_path = os.path.join(workdir, "time.json")
    spent = json.load(open(timing_path))["seconds"] if os.path.exists(timing_path) else 0.0
    bar = tqdm(total=len(y), initial=sum(int(i) < len(y) for i in done), desc="robustness", unit="img",
               disable=not (progress and writer), file=sys.stderr)
    start = time.perf_counter()
    batches = iter_batches(_shared(model).apply, variables, x, y, attacks, int(config.batch_size),
                           jax.random.PRNGKey(int(config.seed)), mesh,
                           skip=lambda idx: all(int(i) in done for i in idx))
    for index, rec in batches:
        rows = [r for r in _csv_rows(index, rec, attacks) if r["img"] not in done]
        if writer:
            per_example.append(rows)
            spent += time.perf_counter() - start
            start = time.perf_counter()
            with open(timing_path + ".tmp", "w") as f:
                json.dump({"seconds": spent}, f)
            os.replace(timing_path + ".tmp", timing_path)
        done.update({r["img"]: {c: fmt(v) for c, v in r.items()} for r in rows})
        bar.update(len(rows))
    bar.close()
    missing = [i for i in range(len(y)) if i not in done]
    if missing:
        raise AdvalignError(f"{per_example.path}: {len(missing)} examples missing after the run (first: {missing[0]})")
    rows = [done[i] for i in range(len(y))]
    if any(int(r["label"]) != int(y[i]) for i, r in enumerate(rows)):
        raise AdvalignError(f"{per_example.path} holds labels that differ from data.source={config.data.source!r}; "
                            "use another --config.workdir")
    summary = summarise(_arrays_from_csv(rows, attacks), attacks)
    name = os.path.basename(os.path.normpath(config.model_dir))
    out = summary_rows(name, summary, spent)
    if writer:
        write_csv(os.path.join(workdir, "summary.csv"), SUMMARY_COLUMNS, out)
    return out


def format_summary(rows: Sequence[dict]) -> str:
    """The summary rows as a text table (accuracies in percent)."""
    from advalign_jax.evaluation.results import format_table  # pylint: disable=import-outside-toplevel

    def pct(v):
        return "" if isinstance(v, float) and math.isnan(v) else f"{100 * v:.2f}%"

    table = [{"attack": r["attack"], "stage": r["stage"] or "-", "norm": r["norm"] or "-",
              "eps": "-" if math.isnan(r["eps"]) else f"{r['eps']:.4g}", "clean": pct(r["clean_accuracy"]),
              "robust": pct(r["robust_accuracy"])} for r in rows]
    return format_table(table, ["attack", "stage", "norm", "eps", "clean", "robust"])
