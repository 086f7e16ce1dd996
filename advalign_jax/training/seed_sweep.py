"""Many seeds of a small model trained at once: one compiled program, the seeds vmapped.

Where the outcome of training is chaotic (PAG's toy 2-D experiment: Adam at a constant 0.01 on inputs
near 100, whose decision boundary swings between seeds), one seed's number says little and a number from one
machine may not reproduce on another. This module trains S seeds of one config side by side and reports
the distribution of the results.

What seed ``s`` runs is what ``advalign-jax train`` runs with ``--config.seed=s`` on one device
(:func:`advalign_jax.training.trainer.train`), built from the same pieces:

- the model from the registry (:func:`advalign_jax.training.step.build_model`), initialised with
  ``PRNGKey(s)`` (:func:`~advalign_jax.training.step.init_state`);
- the optimizer and learning-rate schedule of ``config.optimizer`` / ``config.schedule``
  (:mod:`advalign_jax.training.optim`);
- the batches of :class:`advalign_jax.training.inputs.ArrayBatches` with seed ``s`` (a fresh
  permutation per epoch from ``(s, epoch)``, the remainder dropped);
- the objective's ``prepare`` (e.g. PAG's nearest-neighbour sample set) and the trainer's step
  (:func:`~advalign_jax.training.step.train_step`) with its per-step key ``fold_in(PRNGKey(s + 1), step)``;
- at the end, the trainer's evaluation attack (:func:`advalign_jax.training.periodic_eval.eval_attacks`)
  on the test split, on the evaluation protocol: the robust evaluation's attack sequence
  (:func:`advalign_jax.evaluation.robust.sequence.batch_outputs`) traced into one program vmapped over the
  seeds, with the trainer's key ``PRNGKey(s + 7)``.

Only the one-device arithmetic is shared: no checkpoints, metrics files or data parallelism, and only
``data_kind='arrays'``. ``tests/training/test_seed_sweep.py`` checks that seed ``s`` ends with the parameters of
``train(config with seed=s)`` (on the development CPU the toy runs agree bitwise, to the last of 4,600
steps). Float32 rounding may differ on another CPU, and even with the number of seeds sharing the
program (XLA picks kernels by shape): a chaotic recipe turns that into another outcome for the same
seed, so what a sweep measures is the distribution over seeds, not any one seed's number. The step
counters (the trainer's step, the optimizer's count) stay unbatched, so the schedule and Adam's bias
correction are computed as in the trainer; PAG's nearest-neighbour targets are looked up in a table
computed once by the trainer's own search (:meth:`SeedSweep.nearest_neighbour_tables`).

Cost: ``vmap`` batches every operation over the seeds, which makes MLP-sized models nearly free (16
seeds of each toy model in less time than one ``train`` of the PAG model), but XLA:CPU runs a batched
convolution as a grouped one, slower per seed than the trainer's separate runs (the digits CNN: about
2x); for convolutional models, train seeds one by one.

Two counts of the points a model keeps under the attack (:func:`kept_counts`), both reported:

- ``kept_adversarial``: the prediction at the attacked point equals the label, ``pred(x_adv) = y``
  (how the PAG paper counts its toy result, 35/600 vs 583/600);
- ``kept_robust``: correct both clean and attacked, ``pred(x) = y and pred(x_adv) = y`` (AutoAttack's
  convention; the trainer's ``eval_robust_accuracy`` times the number of test points).

They differ only on points the model misclassifies clean and the attack then pushes into the right
class. :func:`distribution` gives median, quartiles and range over the seeds.

The command (``python scripts/pag_seed_sweep.py --help``, :mod:`advalign_jax.training.seed_sweep_cmd`) writes ``OUT/VARIANT/seed_S.csv`` (one row
per test point), ``OUT/summary.csv`` (one row per variant and seed), ``OUT/distribution.csv`` (one row
per variant and count) and prints the distribution; a rerun with the same config and seeds reuses the
variants already done.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.errors import ConfigError
from advalign_jax.evaluation.protocol import ArraySource, Evaluator, evaluate_all
from advalign_jax.evaluation.robust.sequence import batch_outputs
from advalign_jax.losses import pag_targets as T
from advalign_jax.training import objectives, optim
from advalign_jax.training.inputs import ArrayBatches, make as make_input
from advalign_jax.training.periodic_eval import eval_attacks, test_split
from advalign_jax.training.step import build_model, init_state, train_step, variables_of

COUNTS = ("clean_correct", "kept_adversarial", "kept_robust")


# ---------------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------------


def kept_counts(labels, clean_pred, adv_pred) -> dict:
    """Counts over the last axis (points) of predictions of shape (..., N):

    ``clean_correct = sum [pred(x) = y]``; ``kept_adversarial = sum [pred(x_adv) = y]`` (the PAG paper's
    count); ``kept_robust = sum [pred(x) = y and pred(x_adv) = y]`` (AutoAttack's robust accuracy, the
    trainer's ``eval_robust_accuracy``, times N). Returns int arrays of shape (...)."""
    labels, clean_pred, adv_pred = np.asarray(labels), np.asarray(clean_pred), np.asarray(adv_pred)
    clean = clean_pred == labels
    adv = adv_pred == labels
    return {"clean_correct": clean.sum(-1), "kept_adversarial": adv.sum(-1), "kept_robust": (clean & adv).sum(-1)}


def distribution(values) -> dict:
    """``median``, ``q1``, ``q3`` (numpy's default linear interpolation between order statistics,
    i.e. Hyndman & Fan type 7), ``min``, ``max`` and ``n`` of a 1-D sample."""
    v = np.asarray(values, np.float64)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "median": float(med), "q1": float(q1), "q3": float(q3), "min": float(v.min()),
            "max": float(v.max())}


# ---------------------------------------------------------------------------------------------------
# Training S seeds
# ---------------------------------------------------------------------------------------------------


def with_seed(config, seed: int):
    """A copy of ``config`` with ``seed`` set (the config stays locked)."""
    c = config.copy_and_resolve_references()
    c.unlock()
    c.seed = int(seed)
    c.lock()
    return c


def _stack(trees: Sequence):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _check(config) -> None:
    if config.data_kind != "arrays":
        raise ConfigError(f"the seed sweep trains on in-memory arrays (data_kind='arrays'), got {config.data_kind!r}")
    if int(config.total_steps) < 1:
        raise ConfigError(f"total_steps must be at least 1, got {config.total_steps}")


class SeedSweep:
    """The compiled pieces for one config (any seed): init, a chunk of training steps, the evaluation.

    ``train(seeds)`` returns the final train states stacked over the seeds (leading axis S; the step
    counters, the same for every seed, stay scalars); ``evaluate(states, seeds)`` the per-point
    predictions on the test split."""

    def __init__(self, config):
        _check(config)
        self.config = config
        self.model = build_model(config)
        self.objective = objectives.get(config.objective.name)
        self.batch_size = int(config.data.batch_size)
        self.total_steps = int(config.total_steps)
        self.lr = optim.schedule(config.schedule, int(config.steps_per_epoch), self.total_steps)
        self.tx = optim.optimizer(config.optimizer, self.lr, self.model.variable_shapes()["params"])
        self.first = make_input("arrays", config, self.batch_size)  # loads the arrays (and targets) once
        self.objective_config = config.objective
        if self.nn_precomputed():  # the batches carry the NN targets (nearest_neighbour_tables)
            self.objective_config = config.objective.copy_and_resolve_references()
            self.objective_config.target_source = "precomputed"
        # Step counters (the trainer's step, the optimizer's count) are the same for every seed: they stay
        # unbatched, so the schedule and Adam's bias correction are computed as the trainer computes them.
        self._compiled = {}
        shapes = jax.eval_shape(self.init_state, jax.random.PRNGKey(0))
        self.state_axes = jax.tree.map(
            lambda a: None if a.ndim == 0 and jnp.issubdtype(a.dtype, jnp.integer) else 0, shapes)

    # ---- pieces of the trainer, per seed -------------------------------------------------------------

    def init_state(self, rng):
        """The trainer's initial state for ``rng = PRNGKey(seed)``."""
        return init_state(self.model, self.tx, rng)

    @staticmethod
    def step_base_key(seed: int):
        """The trainer's ``base_key``: step t of seed s uses ``fold_in(PRNGKey(s + 1), t)``."""
        return jax.random.PRNGKey(int(seed) + 1)

    def update(self, state, batch, context, base_key):
        """One training step, the trainer's (:func:`advalign_jax.training.step.train_step`); returns
        ``(state, loss)``."""
        new, loss, _ = train_step(self.model, self.objective, self.objective_config, self.tx, self.lr, state, batch,
                                  context, base_key)
        return new, loss

    def _scan(self, state, batches, context, base_key):
        """Consecutive steps of one seed over ``batches`` (leading axis: steps)."""
        return jax.lax.scan(lambda s, b: self.update(s, b, context, base_key), state, batches)

    def _chunk_fn(self, with_context: bool):
        """``jit(vmap(scan of steps))`` over the seeds, compiled once per runner."""
        if with_context not in self._compiled:
            axes = self.state_axes
            if with_context:
                fn = jax.vmap(self._scan, in_axes=(axes, 0, 0, 0), out_axes=(axes, 0))
            else:
                fn = jax.vmap(lambda st, b, k: self._scan(st, b, None, k), in_axes=(axes, 0, 0), out_axes=(axes, 0))
            self._compiled[with_context] = jax.jit(fn, donate_argnums=(0,))
        return self._compiled[with_context]

    def streams(self, seeds, targets=None):
        """One :class:`ArrayBatches` per seed over the same arrays, as ``inputs.make`` builds it
        (``targets``: per-seed target gradients to carry instead of the loaded ones)."""
        f = self.first
        return [ArrayBatches(f.images, f.labels, self.batch_size, int(s),
                             targets=f.targets if targets is None else targets[k]) for k, s in enumerate(seeds)]

    def contexts(self, seeds, streams):
        """The objective's per-run constants for each seed (None when it has none), as a list."""
        if not hasattr(self.objective, "prepare"):
            return None
        made = [self.objective.prepare(with_seed(self.config, s), st) for s, st in zip(seeds, streams)]
        return made if made[0] else None

    def nn_precomputed(self) -> bool:
        """Whether the sweep looks PAG's nearest-neighbour targets up instead of searching per step."""
        o = self.config.objective
        return o.name == "pag" and o.target_source == "nearest_neighbour"

    def nearest_neighbour_tables(self, contexts) -> list:
        """PAG's NN targets of every training image, one table (N, C, ...) per seed's sample set.

        The trainer searches the sample set for each batch (``objectives.pag.targets_for``); the
        target of an image is a function of that image, its index and the sample set only (not of its
        batch mates), so a table computed once by the same search gives the same targets and makes a
        step as cheap as the model's."""
        f = self.first
        tables, cache = [], {}
        for ctx in contexts:
            key = np.asarray(ctx["bank_ids"]).tobytes()
            if key not in cache:
                cache[key], _ = T.nearest_neighbour_targets_dataset(
                    f.images, f.labels, int(self.config.model.options.num_classes),
                    chunk_size=int(self.config.objective.nn_chunk_size), bank=(ctx["bank"], ctx["bank_ids"]))
            tables.append(cache[key])
        return tables

    # ---- the sweep ------------------------------------------------------------------------------------

    def train(self, seeds: Sequence[int], progress: bool = False, chunk_steps: Optional[int] = None):
        """Trains every seed for ``config.total_steps``; returns ``(states, losses)``: the final states
        stacked over the seeds and the loss of every step, (S, total_steps)."""
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ConfigError("the seed sweep needs at least one seed")
        streams = self.streams(seeds)
        contexts = self.contexts(seeds, streams)
        if contexts is not None and self.nn_precomputed():
            streams = self.streams(seeds, self.nearest_neighbour_tables(contexts))
            contexts = None
        contexts = jax.device_put(_stack(contexts)) if contexts is not None else None
        rngs = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
        base_keys = jnp.stack([self.step_base_key(s) for s in seeds])
        states = jax.jit(jax.vmap(self.init_state, out_axes=self.state_axes))(rngs)
        chunk = int(chunk_steps or max(1, min(int(self.config.steps_per_epoch), self.total_steps)))
        losses = []
        chunk_fn = self._chunk_fn(contexts is not None)
        done, shown = 0, 0
        start = time.perf_counter()
        tty = sys.stderr.isatty()
        while done < self.total_steps:
            n = min(chunk, self.total_steps - done)
            batches = _stack([_stack([next(st) for _ in range(n)]) for st in streams])
            args = (states, batches, contexts, base_keys) if contexts is not None else (states, batches, base_keys)
            states, loss = chunk_fn(*args)
            losses.append(loss)
            done += n
            if progress and (tty or 10 * (done - shown) >= self.total_steps or done == self.total_steps):
                jax.block_until_ready(loss)
                shown = done
                print(f"  step {done}/{self.total_steps}, {len(seeds)} seeds, {time.perf_counter() - start:.0f} s",
                      end="\r" if tty and done < self.total_steps else "\n", file=sys.stderr, flush=True)
        return states, np.concatenate([np.asarray(x) for x in losses], axis=1)

    def held_out_arrays(self):
        """The test split of ``config.arrays`` (what the trainer evaluates on)."""
        return test_split(self.config)

    def evaluate(self, states, seeds: Sequence[int]) -> dict:
        """Per-point predictions of every seed on the test split: ``label`` (N,), ``clean_pred`` and
        ``adv_pred`` (S, N), under the trainer's evaluation attack (``config.eval_attack``)."""
        x, y = self.held_out_arrays()
        attacks = tuple(eval_attacks(self.config))
        keys = jnp.stack([jax.random.PRNGKey(int(s) + 7) for s in seeds])
        apply_fn = self.model.apply

        def one(variables, key, b):
            out = batch_outputs(apply_fn, variables, b["x"], b["y"], b["index"], b["mask"], key, attacks)
            return out["clean_pred"], out["eval/pred"]

        seeded = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))

        def batch_fn(variables, b):
            clean, adv = seeded(variables, keys, b)
            return {"clean_pred": clean.T, "adv_pred": adv.T}  # (points, seeds)

        def rows(meta, host):
            k = np.flatnonzero(meta["mask"])
            return [{"label": int(meta["label"][i]), "clean_pred": host["clean_pred"][i], "adv_pred": host["adv_pred"][i]}
                    for i in k]

        def summarise(rs):
            return {"label": np.array([r["label"] for r in rs]),
                    "clean_pred": np.stack([r["clean_pred"] for r in rs], axis=1),
                    "adv_pred": np.stack([r["adv_pred"] for r in rs], axis=1)}

        evaluator = Evaluator(batch_fn=batch_fn, inputs=("x", "y", "index", "mask"), rows=rows, summarise=summarise)
        source = ArraySource({"x": np.asarray(x, np.float32), "y": np.asarray(y, np.int32)}, len(y))  # one batch
        return evaluate_all(evaluator, variables_of(states), source)


def sweep(config, seeds: Sequence[int], progress: bool = False) -> dict:
    """Trains and evaluates ``config`` for every seed; returns ``seeds``, ``states`` (stacked),
    ``final_loss`` (S,), ``finite`` (S,) (every step's loss finite), the predictions of
    :meth:`SeedSweep.evaluate` and the counts of :func:`kept_counts` (S,)."""
    runner = SeedSweep(config)
    states, losses = runner.train(seeds, progress=progress)
    preds = runner.evaluate(states, seeds)
    counts = kept_counts(preds["label"], preds["clean_pred"], preds["adv_pred"])
    return {"seeds": [int(s) for s in seeds], "states": states, "final_loss": losses[:, -1],
            "finite": np.isfinite(losses).all(axis=1), **preds, **counts, "n": len(preds["label"])}
