"""The per-batch computation of the robust-accuracy evaluation: every attack of a list on one batch.

:class:`AttackSequence` is the sequence, written once: the clean pass, then each attack, a cascade's
stages each on the survivors of the previous ones; run as separately compiled, timed pieces
(:func:`compiled_sequence`, cached per attack list and batch shape) or traced whole into a caller's
program (:func:`batch_outputs`). :func:`robust_records` turns a batch's outputs into the per-example
records (robust = correct clean and at the returned point).
Every random draw of an example comes from its dataset index, so an example's result does not depend
on its batch mates.
"""

from __future__ import annotations

import functools
import math
import time
import zlib
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax import parallel
from advalign_jax.attacks import autoattack as AA
from advalign_jax.attacks.pgd import pgd
from advalign_jax.evaluation.robust.attacks import Attack, Cascade, PGDAttack, check_attacks, fit_to_classes

DEFAULT_CHUNKS = 4


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
    cfg = fit_to_classes(attack.stages[s][1], num_classes, attack.name)
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
        self.run_s = 0.0

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


class _Traced:
    """The function itself, called inside the caller's trace (no compilation, no time)."""

    compile_s = 0.0
    run_s = 0.0

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class AttackSequence:
    """``(variables, x, y, index, mask, key) -> dict``: the clean pass, then each attack of the list, a
    cascade's stages each on the examples still robust after the previous ones.

    Keys: ``clean_pred``, ``grad_zero``; per attack ``NAME/pred`` (prediction at the returned point),
    ``NAME/norm`` (perturbation norm in the attack's norm); per cascade ``NAME/stage`` (the stage
    that flipped the example, -1 if none); with ``keep_adversarial`` ``NAME/x_adv``. ``chunk``,
    ``sharding``: how cascade stages gather their survivors (:func:`cascade_stage`).

    ``compiled=True``: each piece (the clean pass, each PGD attack, each cascade stage) is its own
    compiled program, so that each is timed: :attr:`seconds` holds ``{(attack, stage): seconds}`` of the
    last call (``stage`` '' for an attack as a whole, ``('compile', '')`` for compilation).
    ``compiled=False``: the pieces are traced into the caller's program (``jax.jit``/``jax.vmap`` of the
    whole sequence); the results are the same.
    """

    def __init__(self, apply_fn: Callable, attacks: tuple, keep_adversarial: bool = False,
                 chunk: Optional[int] = None, sharding=None, compiled: bool = True):
        self.attacks = attacks
        piece = _Compiled if compiled else _Traced
        self.seconds: dict = {}

        def clean(v, x, y):
            return _clean(lambda z: apply_fn(v, z), x, y)[:2]

        self.clean = piece(clean)
        self.pieces = {}
        for a in attacks:
            if isinstance(a, PGDAttack):
                def run_pgd(v, x, y, index, key, a=a):
                    f = lambda z: apply_fn(v, z)  # noqa: E731
                    n_cls = jax.eval_shape(f, x).shape[-1]
                    x_adv = _run_pgd(f, x, y, a, _attack_key(key, a.name), index, n_cls)
                    return _finish(f, x, x_adv, a, keep_adversarial)

                self.pieces[a.name] = piece(run_pgd)
                continue
            for s in range(len(a.stages)):
                def stage(v, x, y, index, robust, key, a=a, s=s):
                    f = lambda z: apply_fn(v, z)  # noqa: E731
                    n_cls = jax.eval_shape(f, x).shape[-1]
                    return cascade_stage(f, x, y, index, robust, key, a, s, n_cls, chunk, sharding)

                self.pieces[(a.name, s)] = piece(stage)

            def finish(v, x, x_adv, a=a):
                return _finish(lambda z: apply_fn(v, z), x, x_adv, a, keep_adversarial)

            self.pieces[(a.name, "finish")] = piece(finish)
        self.take = jax.jit(_take_stage, static_argnums=5) if compiled else _take_stage

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
        self.seconds = seconds
        return out


def batch_outputs(apply_fn: Callable, variables, x, y, index, mask, key, attacks: Sequence[Attack],
                  keep_adversarial: bool = False, chunk: Optional[int] = None, sharding=None) -> dict:
    """The outputs of :class:`AttackSequence` on one batch, traceable as a whole (e.g. inside
    ``jax.jit(jax.vmap(...))`` over several models' variables)."""
    sequence = AttackSequence(apply_fn, check_attacks(attacks), keep_adversarial, chunk, sharding, compiled=False)
    return sequence(variables, x, y, index, mask, key)


def _chunk(batch_size: int, unit: int, chunks: int) -> int:
    """Survivors per chunk: ``batch_size / chunks`` rounded up to a multiple of the data-parallel size."""
    return min(batch_size, math.ceil(batch_size / max(chunks, 1) / unit) * unit)


@functools.lru_cache(maxsize=32)
def compiled_sequence(apply_fn: Callable, attacks: tuple, keep_adversarial: bool = False, mesh=None,
                      batch_size: int = 0, chunks: int = DEFAULT_CHUNKS) -> AttackSequence:
    """The compiled :class:`AttackSequence` of ``attacks`` (cached: the per-epoch evaluation compiles
    once); cascade stages attack their survivors ``batch_size / chunks`` at a time (all at once if
    ``batch_size`` is 0), constrained to ``mesh``'s data-parallel sharding."""
    attacks = check_attacks(attacks)
    unit = parallel.data_parallel_size(mesh) if mesh is not None else 1
    chunk = _chunk(batch_size, unit, chunks) if batch_size else None
    sharding = parallel.data_sharding(mesh) if mesh is not None else None
    return AttackSequence(apply_fn, attacks, keep_adversarial, chunk, sharding)


def robust_records(host: dict, labels, attacks: Sequence[Attack]) -> dict:
    """Host outputs of real examples -> records with the robustness flags: ``label``, ``clean_correct``,
    ``NAME/robust`` (correct clean and at the attack's returned point) and ``robust_to_all``."""
    rec = dict(host)
    rec["label"] = labels
    rec["clean_correct"] = host["clean_pred"] == labels
    every = rec["clean_correct"].copy()
    for a in attacks:
        rec[f"{a.name}/robust"] = rec["clean_correct"] & (host[f"{a.name}/pred"] == labels)
        every &= rec[f"{a.name}/robust"]
    rec["robust_to_all"] = every
    return rec
