"""Robust accuracy of a classifier on in-memory images: clean, PGD, APGD, FAB, Square and AutoAttack.

An evaluation is a list of attacks, each with a name and a radius:

- :class:`PGDAttack`: any :class:`~advalign_jax.attacks.pgd.PGDConfig` (Madry-lab conventions),
  untargeted, or targeted at class ``(y + 1) mod C`` (``target='next'``: the other class of a binary
  task, the PAG toy evaluation); :func:`pgd_attack` builds the usual evaluation (``steps`` steps of
  ``2.5 eps / steps``, best-loss iterate, no random start) and :data:`PAG_EPOCH_EVAL` the PAG
  official per-epoch check (untargeted L2, eps 0.5, 7 steps of ``1.5 eps / 7``, random start uniform
  in ``+-8/255`` per pixel, last iterate; ``../shared/spec/pag.md``; PAG's mean cross-entropy and our
  per-example one give the same normalised L2 step).
- :class:`Cascade`: stages run as AutoAttack runs its attacks, each on the points still robust
  after the previous ones (:mod:`advalign_jax.attacks.autoattack`); a stage is APGD
  (:class:`~advalign_jax.attacks.apgd.APGDConfig`), FAB (:class:`~advalign_jax.attacks.fab.FABConfig`)
  or Square (:class:`~advalign_jax.attacks.square.SquareConfig`). :func:`autoattack_attack` builds
  AutoAttack itself, ``standard`` (APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, Square
  with 5,000 queries: the field's robustness number), ``plus`` or ``rand``; :func:`single_attack`
  one of its attacks on its own; :func:`autoattack_whitebox` its APGD-CE + APGD-T part. With C classes
  the targeted stages use ``min(9, C - 1)`` targets. Each stage attacks only the survivors of the
  previous ones, gathered at the front of the batch and attacked a chunk at a time (a quarter of the
  batch by default), so the later stages cost what their survivors cost; the results are those of
  attacking the whole batch with the others masked (every example's draws come from its index).

Default radii are RobustBench's for CIFAR-sized images: L2 0.5, Linf 8/255 (:data:`ROBUSTBENCH_EPS`).

**What is reported** (AutoAttack's convention): an example is *robust* under an attack when the
model classifies it correctly both clean and at the attack's returned point (the prediction is
recomputed there, as AutoAttack's final check does); robust accuracy is the fraction of robust
examples, so it never exceeds the clean accuracy. ``adversarial_accuracy`` (correct at the returned
point whatever the clean prediction: the ``robustness`` library's and PAG's number) is reported too,
the robust accuracy after each stage of a cascade and the time each stage took (RobustBench's report:
clean accuracy, robust accuracy after each attack, the final figure), and ``robust_to_all``: the
fraction robust under every attack of the list (the per-example worst case). Every attack and every
stage is its own compiled function; its time is the wall-clock time of its calls, compilation
excluded (the job's ``wall_time_s`` includes it).

**Checks** (AutoAttack's, :mod:`advalign_jax.attacks.autoattack`): before the attacks, on the first
batch, whether the model looks randomised (two forward passes differ), whether its outputs look like
probabilities, whether inputs lie outside the pixel box, whether a targeted stage asks for more targets
than there are classes; after them, points with a zero input gradient, Square breaking points the
gradient-based stages could not, and later stages breaking points far inside the radius. Each check
that fires is logged as a warning and named in the summary's ``checks`` column.

:func:`iter_batches` runs a list of attacks over a dataset in batches of a fixed size (the last one
padded, with a mask, so no example is dropped and one compiled function serves every batch),
optionally sharding each batch over a device mesh (:mod:`advalign_jax.parallel`);
:func:`evaluate_robustness` collects them and :func:`epoch_metrics` gives the trainer's per-epoch
numbers. Every random draw of an example comes from its dataset index (``fold_in``), and the model
must be in inference mode, so an example's result does not depend on its batch mates, the batch size
or the number of devices (up to floating-point summation order).

**The job** (:func:`evaluate`, ``advalign-jax evaluate-robust``, ``configs/robustness.py``): one model
directory, one dataset from :func:`advalign_jax.data.images.load_arrays` (or ``embedded``: the
embedded synthetic ClickMe records the demonstration checkpoints were trained on), the attacks of
``config.attacks``. Files in ``config.workdir``: ``per_example.csv`` (``img,label,clean_pred,grad_zero``
(1 if the input gradient of the cross-entropy is exactly zero), then per attack ``NAME/pred``,
``NAME/robust`` (0/1), ``NAME/norm`` (perturbation norm in the attack's norm) and for cascades
``NAME/stage`` (the stage that flipped the example, ``none`` if none), then ``robust_to_all``),
written batch by batch; ``summary.csv`` (one row per attack, per cascade stage and ``all``:
``model,attack,stage,norm,eps,num_examples,clean_accuracy,robust_accuracy,adversarial_accuracy,
max_perturbation,wall_time_s,stage_time_s,checks``); ``config.json``; ``time.json``. A rerun with the
same configuration resumes where the last one stopped (results do not depend on the batching, so a
resumed run gives the same files; ``max_examples`` is not part of the configuration a workdir is tied
to, so a run can be extended to more examples later).
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
from advalign_jax.attacks import autoattack as AA
from advalign_jax.attacks.apgd import APGDConfig
from advalign_jax.attacks.fab import FABConfig
from advalign_jax.attacks.pgd import PGDConfig, pgd
from advalign_jax.attacks.square import SquareConfig
from advalign_jax.errors import AdvalignError, ConfigError, DataError

ROBUSTBENCH_EPS = {"l2": 0.5, "linf": 8.0 / 255.0}
TARGETS = ("none", "next")
STAGE_CONFIGS = (APGDConfig, FABConfig, SquareConfig)
DEFAULT_CHUNKS = 4


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
class Cascade:
    """Stages ``((stage_name, config), ...)`` at radius ``eps``, each on the points still robust after
    the previous ones (all stages share one norm); ``version``: the AutoAttack version it is
    (``standard``, ``plus``, ``rand``), or ``''``."""

    name: str
    eps: float
    stages: tuple
    version: str = ""

    def __post_init__(self):
        if not self.stages:
            raise ConfigError(f"attack {self.name!r}: a cascade needs at least one stage")
        for _, cfg in self.stages:
            if not isinstance(cfg, STAGE_CONFIGS):
                raise ConfigError(f"attack {self.name!r}: a stage must be an APGD, FAB or Square config, got {cfg!r}")
        norms = {cfg.norm for _, cfg in self.stages}
        if len(norms) != 1:
            raise ConfigError(f"attack {self.name!r}: the stages mix norms {sorted(norms)}")
        names = [s for s, _ in self.stages]
        if len(set(names)) != len(names) or "none" in names:
            raise ConfigError(f"attack {self.name!r}: stage names {names} must be distinct and not 'none'")

    @property
    def norm(self) -> str:
        return self.stages[0][1].norm


APGDCascade = Cascade  # the name of the APGD-only cascades, kept for callers
Attack = Union[PGDAttack, Cascade]


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
                        name: Optional[str] = None) -> Cascade:
    """APGD-CE then APGD-T (targeted DLR, ``n_target_classes`` targets), AutoAttack "standard"'s
    gradient-based part; ``stages`` picks a part of it (:func:`autoattack_attack` is the whole)."""
    eps = _radius(norm, eps)
    try:
        made = {"apgd-ce": APGDConfig(norm=norm, n_iter=int(n_iter), n_restarts=int(n_restarts), loss="ce",
                                      clip=_clip(clip)),
                "apgd-t": APGDConfig(norm=norm, n_iter=int(n_iter), n_restarts=int(n_restarts), loss="dlr-targeted",
                                     n_target_classes=int(n_target_classes), clip=_clip(clip))}
    except ValueError as err:
        raise ConfigError(f"apgd: {err}") from None
    return Cascade(name or f"apgd-ce+t-{norm}", eps, tuple((s, made[s]) for s in stages))


def autoattack_attack(norm: str, eps: Optional[float] = None, version: str = "standard", n_iter: int = 100,
                      n_target_classes: int = 9, fab_iter: int = 100, n_queries: int = 5000, restarts: int = 5,
                      eot_iter: int = 20, clip=(0.0, 1.0), name: Optional[str] = None) -> Cascade:
    """AutoAttack ``version`` (``standard``, ``plus``, ``rand``) at radius ``eps`` (RobustBench's by
    default), with AutoAttack's budgets by default (:func:`~advalign_jax.attacks.autoattack.version_stages`)."""
    eps = _radius(norm, eps)
    clip = _clip(clip)
    try:
        stages = AA.version_stages(version, norm, n_iter=int(n_iter), n_target_classes=int(n_target_classes),
                                   n_queries=int(n_queries), restarts=int(restarts), eot_iter=int(eot_iter),
                                   fab_iter=int(fab_iter), clip=clip)
    except ValueError as err:
        raise ConfigError(f"autoattack: {err}") from None
    if clip is None and any(isinstance(cfg, FABConfig) for _, cfg in stages):
        raise ConfigError("autoattack: FAB projects within the pixel box; set clip (e.g. (0.0, 1.0))")
    suffix = "" if version == "standard" else f"-{version}"
    return Cascade(name or f"autoattack{suffix}-{norm}", eps, stages, version)


SINGLE = ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square")


def single_attack(kind: str, norm: str, eps: Optional[float] = None, n_iter: int = 100, n_restarts: int = 1,
                  n_target_classes: int = 9, fab_iter: int = 100, fab_restarts: int = 1, n_queries: int = 5000,
                  p_init: float = 0.8, square_restarts: int = 1, clip=(0.0, 1.0),
                  name: Optional[str] = None) -> Cascade:
    """One of AutoAttack's attacks on its own (``kind`` in :data:`SINGLE`), as a one-stage cascade."""
    eps = _radius(norm, eps)
    clip = _clip(clip)
    try:
        if kind.startswith("apgd"):
            loss = {"apgd-ce": "ce", "apgd-t": "dlr-targeted", "apgd-dlr": "dlr"}[kind]
            cfg = APGDConfig(norm=norm, n_iter=int(n_iter), n_restarts=int(n_restarts), loss=loss,
                             n_target_classes=int(n_target_classes), clip=clip)
        elif kind.startswith("fab"):
            if clip is None:
                raise ValueError("FAB projects within the pixel box; set clip (e.g. (0.0, 1.0))")
            cfg = FABConfig(norm=norm, n_iter=int(fab_iter), n_restarts=int(fab_restarts), targeted=kind == "fab-t",
                            n_target_classes=int(n_target_classes), clip=clip)
        elif kind == "square":
            cfg = SquareConfig(norm=norm, n_queries=int(n_queries), p_init=float(p_init),
                               n_restarts=int(square_restarts), clip=clip)
        else:
            raise ValueError(f"unknown attack {kind!r}; use one of {SINGLE}")
    except ValueError as err:
        raise ConfigError(f"{kind}: {err}") from None
    return Cascade(name or f"{kind}-{norm}", eps, ((kind, cfg),))


# PAG's official per-epoch robustness check.
PAG_EPOCH_EVAL = PGDAttack("pag-pgd7-l2", 0.5, PGDConfig(norm="l2", steps=7, step_size=1.5 * 0.5 / 7,
                                                        random_start="box", start_radius=8.0 / 255.0))


def default_attacks() -> list:
    """PGD-20 under L2 and Linf, then APGD-CE + APGD-T under L2 and Linf, at RobustBench's radii."""
    return [pgd_attack("l2"), pgd_attack("linf"), autoattack_whitebox("l2"), autoattack_whitebox("linf")]


ATTACK_KINDS = ("pgd", "apgd", "apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square", "autoattack",
                "autoattack-plus", "autoattack-rand")


def attacks_from_config(c) -> tuple:
    """The attacks of ``c.attacks``, each ``KIND-NORM`` (KIND in :data:`ATTACK_KINDS`: ``pgd``,
    ``apgd`` (APGD-CE then APGD-T), one attack of AutoAttack alone, or ``autoattack`` (standard),
    ``autoattack-plus``, ``autoattack-rand``; NORM: ``l2``, ``linf``), at radii ``c.eps.l2`` /
    ``c.eps.linf`` with the budgets of the ``pgd``, ``apgd``, ``fab``, ``square`` and ``autoattack``
    blocks; the attack's name is the string itself."""
    specs = (c.attacks,) if isinstance(c.attacks, str) else tuple(c.attacks)
    if not specs:
        raise ConfigError("config.attacks is empty: name at least one attack (e.g. 'autoattack-linf')")
    attacks = []
    for spec in specs:
        kind, _, norm = str(spec).rpartition("-")
        if kind not in ATTACK_KINDS or norm not in ROBUSTBENCH_EPS:
            raise ConfigError(f"config.attacks: unknown attack {spec!r}; use KIND-NORM with KIND in "
                              f"{', '.join(ATTACK_KINDS)} and NORM l2 or linf (e.g. 'autoattack-linf')")
        eps = float(c.eps[norm])
        if kind == "pgd":
            attacks.append(pgd_attack(norm, eps, steps=c.pgd.steps, step_factor=c.pgd.step_factor,
                                      random_start=c.pgd.random_start, use_best=c.pgd.use_best, clip=c.clip,
                                      name=spec))
        elif kind == "apgd":
            attacks.append(autoattack_whitebox(norm, eps, n_iter=c.apgd.n_iter,
                                               n_target_classes=c.apgd.n_target_classes, n_restarts=c.apgd.n_restarts,
                                               clip=c.clip, name=spec))
        elif kind.startswith("autoattack"):
            version = kind.partition("-")[2] or "standard"
            attacks.append(autoattack_attack(norm, eps, version, n_iter=c.apgd.n_iter,
                                             n_target_classes=c.apgd.n_target_classes, fab_iter=c.fab.n_iter,
                                             n_queries=c.square.n_queries, restarts=c.autoattack.plus_restarts,
                                             eot_iter=c.autoattack.eot_iter, clip=c.clip, name=spec))
        else:
            attacks.append(single_attack(kind, norm, eps, n_iter=c.apgd.n_iter, n_restarts=c.apgd.n_restarts,
                                         n_target_classes=c.apgd.n_target_classes, fab_iter=c.fab.n_iter,
                                         fab_restarts=c.fab.n_restarts, n_queries=c.square.n_queries,
                                         p_init=c.square.p_init, square_restarts=c.square.n_restarts, clip=c.clip,
                                         name=spec))
    return _check_attacks(attacks)


def _check_attacks(attacks: Sequence[Attack]) -> tuple:
    attacks = tuple(attacks)
    names = [a.name for a in attacks]
    for a in attacks:
        if not isinstance(a, (PGDAttack, Cascade)):
            raise ConfigError(f"unknown attack {a!r}: use PGDAttack or Cascade")
        if not a.name or "/" in a.name or "," in a.name or a.name == "all":
            raise ConfigError(f"attack name {a.name!r} must be non-empty, not 'all', and contain no '/' or ','")
        if not a.eps > 0:
            raise ConfigError(f"attack {a.name!r}: eps must be positive, got {a.eps}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two attacks are named {dup[0]!r}; results are filed by name")
    return attacks


def _fit_to_classes(cfg, num_classes: int, name: str):
    """A stage on C classes: ``min(n_target_classes, C - 1)`` targets; the DLR losses need 3 (4) classes."""
    try:
        return AA.fit_to_classes(cfg, num_classes)
    except ValueError as err:
        hint = "; use apgd-ce or pgd" if "classes" in str(err) else ""
        raise ConfigError(f"attack {name!r}: {err}{hint}") from None


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


def cascade_stage(f: Callable, x, y, index, robust, key, attack: Cascade, s: int, num_classes: int,
                  chunk: Optional[int] = None, sharding=None):
    """Stage ``s`` of ``attack`` on the ``robust`` examples only (compacted, ``chunk`` at a time;
    :func:`~advalign_jax.attacks.autoattack.on_survivors`): ``(x_stage, broken)``."""
    cfg = _fit_to_classes(attack.stages[s][1], num_classes, attack.name)
    k = jax.random.fold_in(_attack_key(key, attack.name), s)
    eps = jnp.full(x.shape[:1], attack.eps, x.dtype)

    def run(xx, yy, ii, ee, mm):
        return AA.run_stage(f, xx, yy, ee, cfg, k, ii, mm)

    xs, ok, _ = AA.on_survivors(run, x, y, index, eps, robust, chunk, sharding)
    return xs, ok


def _take_stage(x_adv, stage, robust, xs, ok, s):
    x_adv = jnp.where(ok.reshape((-1,) + (1,) * (x_adv.ndim - 1)), xs, x_adv)
    return x_adv, jnp.where(ok, s, stage), robust & ~ok


def _clean(f, x, y):
    logits = f(x)
    return jnp.argmax(logits, axis=1), AA.zero_gradients(f, x, y), logits.shape[-1]


def batch_outputs(apply_fn: Callable, variables, x, y, index, mask, key, attacks: Sequence[Attack],
                  keep_adversarial: bool = False, chunk: Optional[int] = None, sharding=None) -> dict:
    """Per-example results of every attack on one batch, traceable as a whole (:func:`make_batch_fn`
    compiles it attack by attack and stage by stage, and times them).

    Keys: ``clean_pred``, ``grad_zero``; per attack ``NAME/pred`` (prediction at the returned point),
    ``NAME/norm`` (perturbation norm in the attack's norm); per cascade ``NAME/stage`` (the stage
    that flipped the example, -1 if none); with ``keep_adversarial`` ``NAME/x_adv``. ``chunk``,
    ``sharding``: how cascade stages gather their survivors (:func:`cascade_stage`)."""
    def f(z):
        return apply_fn(variables, z)

    clean_pred, grad_zero, num_classes = _clean(f, x, y)
    out = {"clean_pred": clean_pred, "grad_zero": grad_zero}
    for attack in attacks:
        if isinstance(attack, PGDAttack):
            x_adv = _run_pgd(f, x, y, attack, _attack_key(key, attack.name), index, num_classes)
        else:
            robust = (clean_pred == y) & mask
            x_adv, stage = x, jnp.full(y.shape, -1, jnp.int32)
            for s in range(len(attack.stages)):
                xs, ok = cascade_stage(f, x, y, index, robust, key, attack, s, num_classes, chunk, sharding)
                x_adv, stage, robust = _take_stage(x_adv, stage, robust, xs, ok, s)
            out[f"{attack.name}/stage"] = stage
        out.update(_finish(f, x, x_adv, attack, keep_adversarial))
    return out


def _finish(f, x, x_adv, attack, keep_adversarial):
    out = {f"{attack.name}/pred": jnp.argmax(f(x_adv), axis=1), f"{attack.name}/norm": _norm_of(x_adv - x, attack.norm)}
    if keep_adversarial:
        out[f"{attack.name}/x_adv"] = x_adv
    return out


class _Compiled:
    """A jitted function compiled ahead of time for each new argument signature, with the time spent
    compiling and running it (``compile_s``, ``run_s`` of the last call)."""

    def __init__(self, fn: Callable):
        self.jitted = jax.jit(fn)
        self.cache: dict = {}
        self.compile_s = 0.0

    def __call__(self, *args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        sig = (tree, tuple((np.shape(a), str(getattr(a, "dtype", type(a))), getattr(a, "sharding", None))
                           for a in leaves))
        exe = self.cache.get(sig)
        if exe is None:
            start = time.perf_counter()
            exe = self.cache[sig] = self.jitted.lower(*args).compile()
            self.compile_s += time.perf_counter() - start
        start = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        self.run_s = time.perf_counter() - start
        return out


class BatchFn:
    """``(variables, x, y, index, mask, key) -> dict``: :func:`batch_outputs`, computed as separately
    compiled pieces (the clean pass, each PGD attack, each cascade stage) so that each is timed; the
    dict also holds ``seconds``: ``{(attack, stage): seconds}`` of this call (``stage`` '' for an
    attack as a whole, ``('compile', '')`` for compilation)."""

    def __init__(self, apply_fn: Callable, attacks: tuple, keep_adversarial: bool, chunk: Optional[int], sharding):
        self.attacks = attacks

        def clean(v, x, y):
            return _clean(lambda z: apply_fn(v, z), x, y)[:2]

        self.clean = _Compiled(clean)
        self.pieces = {}
        for a in attacks:
            if isinstance(a, PGDAttack):
                def run_pgd(v, x, y, index, key, a=a):
                    f = lambda z: apply_fn(v, z)  # noqa: E731
                    n_cls = jax.eval_shape(f, x).shape[-1]
                    x_adv = _run_pgd(f, x, y, a, _attack_key(key, a.name), index, n_cls)
                    return _finish(f, x, x_adv, a, keep_adversarial)

                self.pieces[a.name] = _Compiled(run_pgd)
                continue
            for s in range(len(a.stages)):
                def stage(v, x, y, index, robust, key, a=a, s=s):
                    f = lambda z: apply_fn(v, z)  # noqa: E731
                    n_cls = jax.eval_shape(f, x).shape[-1]
                    return cascade_stage(f, x, y, index, robust, key, a, s, n_cls, chunk, sharding)

                self.pieces[(a.name, s)] = _Compiled(stage)

            def finish(v, x, x_adv, a=a):
                return _finish(lambda z: apply_fn(v, z), x, x_adv, a, keep_adversarial)

            self.pieces[(a.name, "finish")] = _Compiled(finish)
        self.take = jax.jit(_take_stage, static_argnums=5)

    def _compile_total(self) -> float:
        return self.clean.compile_s + sum(p.compile_s for p in self.pieces.values())

    def __call__(self, variables, x, y, index, mask, key) -> dict:
        compiled_before = self._compile_total()
        seconds = {}
        clean_pred, grad_zero = self.clean(variables, x, y)
        seconds[("clean", "")] = self.clean.run_s
        out = {"clean_pred": clean_pred, "grad_zero": grad_zero}
        for a in self.attacks:
            if isinstance(a, PGDAttack):
                piece = self.pieces[a.name]
                out.update(piece(variables, x, y, index, key))
                seconds[(a.name, "")] = piece.run_s
                continue
            robust = (clean_pred == y) & mask
            x_adv, stage = x, jnp.full(y.shape, -1, jnp.int32)
            total = 0.0
            for s, (stage_name, _) in enumerate(a.stages):
                piece = self.pieces[(a.name, s)]
                xs, ok = piece(variables, x, y, index, robust, key)
                x_adv, stage, robust = self.take(x_adv, stage, robust, xs, ok, s)
                seconds[(a.name, stage_name)] = piece.run_s
                total += piece.run_s
            finish = self.pieces[(a.name, "finish")]
            out.update(finish(variables, x, x_adv))
            out[f"{a.name}/stage"] = stage
            seconds[(a.name, "")] = total + finish.run_s
        seconds[("compile", "")] = self._compile_total() - compiled_before
        out["seconds"] = seconds
        return out


def _chunk(batch_size: int, unit: int, chunks: int) -> int:
    """Survivors per chunk: ``batch_size / chunks`` rounded up to a multiple of the data-parallel size."""
    return min(batch_size, math.ceil(batch_size / max(chunks, 1) / unit) * unit)


@functools.lru_cache(maxsize=32)
def make_batch_fn(apply_fn: Callable, attacks: tuple, keep_adversarial: bool = False, mesh=None,
                  batch_size: int = 0, chunks: int = DEFAULT_CHUNKS) -> BatchFn:
    """The :class:`BatchFn` of ``attacks`` (cached: the per-epoch evaluation compiles once); cascade
    stages attack their survivors ``batch_size / chunks`` at a time (all at once if ``batch_size`` is
    0), constrained to ``mesh``'s data-parallel sharding."""
    attacks = _check_attacks(attacks)
    unit = parallel.data_parallel_size(mesh) if mesh is not None else 1
    chunk = _chunk(batch_size, unit, chunks) if batch_size else None
    sharding = parallel.data_sharding(mesh) if mesh is not None else None
    return BatchFn(apply_fn, attacks, keep_adversarial, chunk, sharding)


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


def _arrays(images, labels, batch_size: int) -> tuple:
    """Checked inputs: float32 images and int32 labels of the same length, a positive batch size."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim < 2 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"images {images.shape} and labels {labels.shape} must hold the same number of examples")
    if images.shape[0] == 0:
        raise DataError("no examples to evaluate")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    return (images.astype(np.float32) if images.dtype != np.float32 else images), labels.astype(np.int32)


def iter_batches(apply_fn: Callable, variables: Any, images, labels, attacks: Sequence[Attack],
                 batch_size: int = 256, key=None, mesh=None, keep_adversarial: bool = False,
                 skip: Optional[Callable] = None, chunks: int = DEFAULT_CHUNKS) -> Iterator[tuple]:
    """Yields ``(index, records, seconds)`` for each batch: ``index`` the dataset positions of its
    examples, ``records`` host arrays over them (``clean_pred``, ``grad_zero``, ``label``,
    ``clean_correct``, ``NAME/pred``, ``NAME/robust``, ``NAME/norm``, ``NAME/stage`` for cascades,
    ``NAME/x_adv`` if kept, ``robust_to_all``), ``seconds`` the batch's times (:class:`BatchFn`).

    ``apply_fn(variables, x) -> logits`` in inference mode (``model.apply``); images NHWC (or any
    (N, ...) inputs); ``key`` the PRNG key of all random draws (default ``PRNGKey(0)``); ``mesh``: a
    :func:`~advalign_jax.parallel.make_mesh` mesh to shard each batch over (the batch size is rounded
    up to a multiple of its data-parallel size; every process passes the full dataset and computes its
    slice of each batch); ``skip(index) -> bool``: batches not to compute (resume; decided the same on
    every process); ``chunks``: cascade stages attack their survivors in pieces of ``1 / chunks`` of
    the batch.
    """
    attacks = _check_attacks(attacks)
    images, labels = _arrays(images, labels, batch_size)
    n = images.shape[0]
    procs, pid = jax.process_count(), jax.process_index()
    if mesh is None and procs > 1:
        raise ConfigError("a multi-process evaluation needs a mesh")
    unit = math.lcm(parallel.data_parallel_size(mesh), procs) if mesh is not None else 1
    batch_size = math.ceil(min(batch_size, n) / unit) * unit  # no larger than the data needs
    if mesh is not None:
        variables = parallel.replicate(variables, mesh)
    per_process = batch_size // procs
    key = jax.random.PRNGKey(0) if key is None else key
    fn = make_batch_fn(apply_fn, attacks, keep_adversarial, mesh, batch_size, int(chunks))
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
        seconds = out.pop("seconds")
        host = parallel.to_host(out) if mesh is not None else jax.tree.map(np.asarray, out)
        host = {k: v[:len(index)] for k, v in host.items()}
        yield index, _records(host, labels[index], attacks), seconds


def add_seconds(total: dict, seconds: dict) -> dict:
    """Accumulates per-batch times (``{(attack, stage): s}``) into ``total``."""
    for k, v in seconds.items():
        total[k] = total.get(k, 0.0) + float(v)
    return total


@dataclasses.dataclass
class RobustnessResult:
    """``summary`` (:func:`summarise`) and ``per_example``: arrays over the dataset (``index`` and
    the records of :func:`iter_batches`)."""

    summary: dict
    per_example: dict

    def format(self) -> str:
        lines = [f"{'attack':<24} {'norm':<5} {'eps':>8} {'robust acc':>11} {'time (s)':>9}",
                 f"{'clean':<24} {'':<5} {'':>8} {100 * self.summary['clean_accuracy']:>10.2f}%"]
        for name, s in self.summary["attacks"].items():
            lines.append(f"{name:<24} {s['norm']:<5} {s['eps']:>8.4f} {100 * s['robust_accuracy']:>10.2f}% "
                         f"{s.get('seconds', float('nan')):>9.2f}")
            for stage, acc in s.get("after_stage", {}).items():
                lines.append(f"  after {stage:<16} {'':<5} {'':>8} {100 * acc:>10.2f}% "
                             f"{s.get('stage_seconds', {}).get(stage, float('nan')):>9.2f}")
            if s.get("checks"):
                lines.append(f"  checks: {', '.join(s['checks'])}")
        lines.append(f"{'all (worst case)':<24} {'':<5} {'':>8} {100 * self.summary['robust_to_all']:>10.2f}%")
        return "\n".join(lines)


def summarise(per_example: dict, attacks: Sequence[Attack], checks: Optional[dict] = None,
              seconds: Optional[dict] = None) -> dict:
    """``n``, ``clean_accuracy``, ``robust_to_all``, ``checks`` (``{name: message}``: the checks made
    before the attacks (``checks``) and ``zero_gradient``) and per attack (``attacks``) a dict:
    ``robust_accuracy``, ``adversarial_accuracy``, ``norm``, ``eps``, ``max_perturbation``,
    ``seconds``, ``checks`` (the global ones and the attack's own), and for cascades ``after_stage``
    (the robust accuracy after each stage) and ``stage_seconds``. ``seconds``: ``{(attack, stage):
    seconds}`` (:class:`BatchFn`)."""
    n = len(per_example["label"])
    seconds = seconds or {}

    def mean(a):
        return float(np.mean(a)) if n else float("nan")

    found = dict(checks or {})
    if "grad_zero" in per_example:
        msg = AA.check_zero_gradients(int(np.sum(per_example["grad_zero"])), n)
        if msg:
            found["zero_gradient"] = msg
    summary = {"n": n, "clean_accuracy": mean(per_example["clean_correct"]),
               "robust_to_all": mean(per_example["robust_to_all"]), "checks": found, "attacks": {}}
    shared = {k: v for k, v in found.items() if k != "n_classes"}  # about the model and data: every attack
    for a in attacks:
        s = {"robust_accuracy": mean(per_example[f"{a.name}/robust"]),
             "adversarial_accuracy": mean(per_example[f"{a.name}/pred"] == per_example["label"]),
             "norm": a.norm, "eps": float(a.eps),
             "max_perturbation": float(np.max(per_example[f"{a.name}/norm"])) if n else 0.0,
             "seconds": seconds.get((a.name, ""), float("nan")), "checks": dict(shared)}
        if isinstance(a, Cascade):
            stage = per_example[f"{a.name}/stage"]
            ok = np.asarray(per_example["clean_correct"], bool).copy()
            s["after_stage"], s["stage_seconds"] = {}, {}
            for j, (stage_name, _) in enumerate(a.stages):
                ok &= stage != j
                s["after_stage"][stage_name] = mean(ok)
                s["stage_seconds"][stage_name] = seconds.get((a.name, stage_name), float("nan"))
            own = {"square_gain": AA.check_square_gain(s["after_stage"]),
                   "small_perturbation": AA.check_small_perturbation(stage, per_example[f"{a.name}/norm"], a.eps,
                                                                     [name for name, _ in a.stages])}
            if any(AA.targets_asked(cfg) for _, cfg in a.stages):
                own["n_classes"] = found.get("n_classes")
            s["checks"].update({k: v for k, v in own.items() if v})
        summary["attacks"][a.name] = s
    return summary


def pre_checks(apply_fn: Callable, variables: Any, images, labels, attacks: Sequence[Attack], clip,
               batch_size: int = 256) -> dict:
    """The checks made before the attacks (:func:`~advalign_jax.attacks.autoattack.run_checks`) on the
    first ``batch_size`` examples (the input range on all of them): ``{name: message}``."""
    x = np.asarray(images[:batch_size], np.float32)
    y = np.asarray(labels[:batch_size])
    fwd = jax.jit(apply_fn)
    stages = [st for a in attacks if isinstance(a, Cascade) for st in a.stages]
    rand_only = all(isinstance(a, Cascade) and a.version == "rand" for a in attacks) and attacks
    found = AA.run_checks(lambda z: fwd(variables, z), x, y, stages, None, "rand" if rand_only else "standard")
    msg = AA.check_input_range(np.asarray(images), clip)
    if msg:
        found["input_range"] = msg
    return found


def evaluate_robustness(apply_fn: Callable, variables: Any, images, labels, attacks: Optional[Sequence[Attack]] = None,
                        batch_size: int = 256, key=None, mesh=None, keep_adversarial: bool = False,
                        progress: bool = False, checks: bool = True, clip=(0.0, 1.0),
                        chunks: int = DEFAULT_CHUNKS) -> RobustnessResult:
    """Runs ``attacks`` (default :func:`default_attacks`) on every example (see :func:`iter_batches`);
    returns a :class:`RobustnessResult`. ``checks``: run AutoAttack's checks (logged as warnings and
    listed in the summary), with ``clip`` the pixel box of the input-range check."""
    attacks = _check_attacks(default_attacks() if attacks is None else attacks)
    images, labels = _arrays(images, labels, batch_size)
    found = pre_checks(apply_fn, variables, images, labels, attacks, clip, batch_size) if checks else {}
    chunks_, seconds = [], {}
    total = math.ceil(len(labels) / max(batch_size, 1))
    for b, (index, rec, sec) in enumerate(iter_batches(apply_fn, variables, images, labels, attacks, batch_size, key,
                                                       mesh, keep_adversarial, chunks=chunks)):
        chunks_.append(rec)
        add_seconds(seconds, sec)
        if progress:
            print(f"robustness: batch {b + 1}/{total}", file=sys.stderr)
    per_example = {k: np.concatenate([c[k] for c in chunks_]) for k in chunks_[0]}
    per_example["index"] = np.arange(len(per_example["label"]))
    summary = summarise(per_example, attacks, found, seconds)
    if checks:
        warn_all(summary)
    return RobustnessResult(summary, per_example)


def warn_all(summary: dict, already: Sequence[str] = ()) -> None:
    """Logs every fired check of a summary once (global ones, then each attack's own), except those
    named in ``already`` (logged before)."""
    AA.warn({k: v for k, v in summary["checks"].items() if k not in already})
    for name, s in summary["attacks"].items():
        AA.warn({k: v for k, v in s.get("checks", {}).items() if k not in summary["checks"] and k not in already}, name)


def clean_accuracy(apply_fn: Callable, variables: Any, images, labels, batch_size: int = 256, mesh=None) -> float:
    """Top-1 accuracy on ``images`` (batched; the same loop with no attack)."""
    return evaluate_robustness(apply_fn, variables, images, labels, attacks=(), batch_size=batch_size,
                               mesh=mesh, checks=False).summary["clean_accuracy"]


def epoch_metrics(apply_fn: Callable, variables: Any, images, labels, attacks: Sequence[Attack] = (PAG_EPOCH_EVAL,),
                  mesh=None, batch_size: int = 256, key=None) -> dict:
    """The trainer's per-epoch numbers on a held-out array set: ``eval_accuracy`` (clean),
    ``eval_robust_accuracy`` (robust under every attack, AutoAttack's convention) and, with several
    attacks, ``eval_robust_accuracy/NAME`` for each. The compiled batch function is cached, so calling
    this every epoch compiles once."""
    result = evaluate_robustness(apply_fn, variables, images, labels, attacks, batch_size=batch_size, key=key,
                                 mesh=mesh, checks=False)
    s = result.summary
    out = {"eval_accuracy": s["clean_accuracy"], "eval_robust_accuracy": s["robust_to_all"]}
    if len(s["attacks"]) > 1:
        out.update({f"eval_robust_accuracy/{name}": a["robust_accuracy"] for name, a in s["attacks"].items()})
    return out


# ----------------------------------------------------------------------------------------------------
# The job: advalign-jax evaluate-robust
# ----------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["model", "attack", "stage", "norm", "eps", "num_examples", "clean_accuracy", "robust_accuracy",
                   "adversarial_accuracy", "max_perturbation", "wall_time_s", "stage_time_s", "checks"]
# Config keys whose values decide the results (a resumed run must agree on them).
RESULT_KEYS = ("model_dir", "arch", "data", "attacks", "eps", "pgd", "apgd", "fab", "square", "autoattack", "clip",
               "dtype", "seed")


def per_example_columns(attacks: Sequence[Attack]) -> list:
    cols = ["img", "label", "clean_pred", "grad_zero"]
    for a in attacks:
        cols += [f"{a.name}/pred", f"{a.name}/robust", f"{a.name}/norm"]
        if isinstance(a, Cascade):
            cols.append(f"{a.name}/stage")
    return cols + ["robust_to_all"]


def _csv_rows(index, rec: dict, attacks: Sequence[Attack]) -> list:
    rows = []
    for k, img in enumerate(index):
        row = {"img": int(img), "label": int(rec["label"][k]), "clean_pred": int(rec["clean_pred"][k]),
               "grad_zero": int(rec["grad_zero"][k]), "robust_to_all": int(rec["robust_to_all"][k])}
        for a in attacks:
            row[f"{a.name}/pred"] = int(rec[f"{a.name}/pred"][k])
            row[f"{a.name}/robust"] = int(rec[f"{a.name}/robust"][k])
            row[f"{a.name}/norm"] = float(rec[f"{a.name}/norm"][k])
            if isinstance(a, Cascade):
                s = int(rec[f"{a.name}/stage"][k])
                row[f"{a.name}/stage"] = a.stages[s][0] if s >= 0 else "none"
        rows.append(row)
    return rows


def _arrays_from_csv(rows: Sequence[dict], attacks: Sequence[Attack]) -> dict:
    """Per-example CSV rows (strings) -> the arrays :func:`summarise` takes."""
    def col(key, kind):
        return np.array([kind(r[key]) for r in rows], dtype=kind)

    out = {"label": col("label", int), "clean_pred": col("clean_pred", int),
           "grad_zero": col("grad_zero", int).astype(bool), "robust_to_all": col("robust_to_all", int).astype(bool)}
    out["clean_correct"] = out["clean_pred"] == out["label"]
    for a in attacks:
        out[f"{a.name}/pred"] = col(f"{a.name}/pred", int)
        out[f"{a.name}/robust"] = col(f"{a.name}/robust", int).astype(bool)
        out[f"{a.name}/norm"] = col(f"{a.name}/norm", float)
        if isinstance(a, Cascade):
            names = [s for s, _ in a.stages]
            out[f"{a.name}/stage"] = np.array([names.index(r[f"{a.name}/stage"]) if r[f"{a.name}/stage"] != "none"
                                               else -1 for r in rows], int)
    return out


def summary_rows(model: str, summary: dict, seconds: float) -> list:
    """The rows of ``summary.csv`` (module docstring) from :func:`summarise`'s dict; ``seconds`` the
    job's wall-clock time."""
    nan = float("nan")
    base = {"model": model, "num_examples": summary["n"], "clean_accuracy": summary["clean_accuracy"],
            "wall_time_s": round(seconds, 3)}

    def t(v):
        return round(v, 3) if isinstance(v, float) and not math.isnan(v) else nan

    rows = []
    for name, s in summary["attacks"].items():
        rows.append({**base, "attack": name, "stage": "", "norm": s["norm"], "eps": s["eps"],
                     "robust_accuracy": s["robust_accuracy"], "adversarial_accuracy": s["adversarial_accuracy"],
                     "max_perturbation": s["max_perturbation"], "stage_time_s": t(s.get("seconds", nan)),
                     "checks": ";".join(sorted(s.get("checks", {})))})
        for stage, acc in s.get("after_stage", {}).items():
            rows.append({**base, "attack": name, "stage": stage, "norm": s["norm"], "eps": s["eps"],
                         "robust_accuracy": acc, "adversarial_accuracy": nan, "max_perturbation": nan,
                         "stage_time_s": t(s["stage_seconds"].get(stage, nan)), "checks": ""})
    every = set(summary.get("checks", {}))
    for s in summary["attacks"].values():
        every |= set(s.get("checks", {}))
    rows.append({**base, "attack": "all", "stage": "", "norm": "", "eps": nan,
                 "robust_accuracy": summary["robust_to_all"], "adversarial_accuracy": nan, "max_perturbation": nan,
                 "stage_time_s": t(sum(s.get("seconds", 0.0) for s in summary["attacks"].values())),
                 "checks": ";".join(sorted(every))})
    return rows


_MODELS: dict = {}


def _shared(model):
    """One Model object per architecture (equal flax modules), so that :func:`make_batch_fn`'s cached
    compiled function serves every run of a process with the same architecture and batch shape."""
    try:
        return _MODELS.setdefault(model.module, model)
    except TypeError:  # an unhashable module: nothing shared
        return model


def _embedded_arrays(limit: Optional[int]) -> tuple:
    """The embedded synthetic ClickMe validation records (224 px, 10 classes) as arrays."""
    from advalign_jax.data import embedded_files  # pylint: disable=import-outside-toplevel
    from advalign_jax.data.reader import ClickMeReader, ReaderConfig  # pylint: disable=import-outside-toplevel

    images, labels = [], []
    for batch in ClickMeReader(ReaderConfig(files=tuple(embedded_files("val")), batch_size=32, num_classes=10)):
        keep = np.asarray(batch["mask"], bool)
        images.append(np.asarray(batch["image"])[keep])
        labels.append(np.asarray(batch["label"])[keep])
        if limit is not None and sum(len(v) for v in labels) >= limit:
            break
    x, y = np.concatenate(images), np.concatenate(labels).astype(np.int32)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def load_data(config, model) -> tuple:
    """The configured arrays, checked against the model (input shape, label range)."""
    from advalign_jax.data.images import load_arrays  # pylint: disable=import-outside-toplevel

    d = config.data
    limit = int(config.max_examples) if config.max_examples > 0 else None
    if d.source == "embedded":
        x, y = _embedded_arrays(limit)
    else:
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


def _load_times(path: str) -> tuple:
    if not os.path.exists(path):
        return 0.0, {}
    with open(path) as f:
        saved = json.load(f)
    stages = {tuple(k.split("/", 1)): v for k, v in saved.get("stages", {}).items()}
    return float(saved["seconds"]), stages


def _save_times(path: str, spent: float, stages: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump({"seconds": spent, "stages": {f"{a}/{s}": v for (a, s), v in stages.items()}}, f)
    os.replace(path + ".tmp", path)


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
    if int(config.stage_chunks) < 1:
        raise ConfigError(f"stage_chunks must be positive, got {config.stage_chunks}")
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
    apply_fn = _shared(model).apply
    checks = pre_checks(apply_fn, variables, x, y, attacks, _clip(config.clip), int(config.batch_size))
    if writer:
        AA.warn(checks)
    per_example = PerImageFile(os.path.join(workdir, "per_example.csv"), per_example_columns(attacks))
    done = dict(per_example.rows)
    timing_path = os.path.join(workdir, "time.json")
    spent, stage_seconds = _load_times(timing_path)
    bar = tqdm(total=len(y), initial=sum(int(i) < len(y) for i in done), desc="robustness", unit="img",
               disable=not (progress and writer), file=sys.stderr)
    start = time.perf_counter()
    batches = iter_batches(apply_fn, variables, x, y, attacks, int(config.batch_size),
                           jax.random.PRNGKey(int(config.seed)), mesh,
                           skip=lambda idx: all(int(i) in done for i in idx), chunks=int(config.stage_chunks))
    for index, rec, seconds in batches:
        rows = [r for r in _csv_rows(index, rec, attacks) if r["img"] not in done]
        add_seconds(stage_seconds, seconds)
        if writer:
            per_example.append(rows)
            spent += time.perf_counter() - start
            start = time.perf_counter()
            _save_times(timing_path, spent, stage_seconds)
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
    summary = summarise(_arrays_from_csv(rows, attacks), attacks, checks, stage_seconds)
    if writer:
        warn_all(summary, already=tuple(checks))
    name = os.path.basename(os.path.normpath(config.model_dir))
    out = summary_rows(name, summary, spent)
    if writer:
        write_csv(os.path.join(workdir, "summary.csv"), SUMMARY_COLUMNS, out)
    return out


def format_summary(rows: Sequence[dict]) -> str:
    """The summary rows as a text table (accuracies in percent; time in seconds, compilation excluded)."""
    from advalign_jax.evaluation.results import format_table  # pylint: disable=import-outside-toplevel

    def pct(v):
        return "" if isinstance(v, float) and math.isnan(v) else f"{100 * v:.2f}%"

    def sec(v):
        return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.1f}"

    table = [{"attack": r["attack"], "stage": r["stage"] or "-", "norm": r["norm"] or "-",
              "eps": "-" if math.isnan(r["eps"]) else f"{r['eps']:.4g}", "clean": pct(r["clean_accuracy"]),
              "robust": pct(r["robust_accuracy"]), "time_s": sec(r["stage_time_s"]), "checks": r["checks"] or "-"}
             for r in rows]
    return format_table(table, ["attack", "stage", "norm", "eps", "clean", "robust", "time_s", "checks"])
