"""Many seeds of a small model trained at once: one compiled program, the seeds vmapped.

Where the outcome of training is chaotic (PAG's toy 2-D experiment: Adam at a constant 0.01 on inputs
near 100; ``../shared/spec/pag.md``, "Stability"), one seed's number says little and a number from one
machine may not reproduce on another. This module trains S seeds of one config side by side and reports
the distribution of the results.

What seed ``s`` runs is what ``advalign-jax train`` runs with ``--config.seed=s`` on one device
(:func:`advalign_jax.training.trainer.train`), built from the same pieces:

- the model from the registry (``trainer.build_model``), initialised with ``PRNGKey(s)``;
- the optimizer and learning-rate schedule of ``config.optimizer`` / ``config.schedule``
  (:mod:`advalign_jax.training.optim`);
- the batches of :class:`advalign_jax.training.inputs.ArrayBatches` with seed ``s`` (a fresh
  permutation per epoch from ``(s, epoch)``, the remainder dropped);
- the objective's ``prepare`` (e.g. PAG's nearest-neighbour sample set) and ``loss`` with the
  trainer's per-step key ``fold_in(PRNGKey(s + 1), step)``;
- at the end, the trainer's evaluation attack (``trainer.eval_attack_config``) on the test split, through
  :func:`advalign_jax.evaluation.robustness.batch_outputs` with the trainer's key ``PRNGKey(s + 7)``.

Only the one-device arithmetic is shared: no checkpoints, metrics files or data parallelism, and only
``data_kind='arrays'``. ``tests/test_seed_sweep.py`` checks that seed ``s`` ends with the parameters of
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

The command (``python scripts/pag_seed_sweep.py --help``) writes ``OUT/VARIANT/seed_S.csv`` (one row
per test point), ``OUT/summary.csv`` (one row per variant and seed), ``OUT/distribution.csv`` (one row
per variant and count) and prints the distribution; a rerun with the same config and seeds reuses the
variants already done.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advalign_jax.errors import ConfigError

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
        from advalign_jax.training import inputs, objectives, optim  # pylint: disable=import-outside-toplevel
        from advalign_jax.training.trainer import build_model  # pylint: disable=import-outside-toplevel

        _check(config)
        self.config = config
        self.model = build_model(config)
        self.objective = objectives.get(config.objective.name)
        self.batch_size = int(config.data.batch_size)
        self.total_steps = int(config.total_steps)
        self.lr = optim.schedule(config.schedule, int(config.steps_per_epoch), self.total_steps)
        self.tx = optim.optimizer(config.optimizer, self.lr, self.model.variable_shapes()["params"])
        self.first = inputs.make("arrays", config, self.batch_size)  # loads the arrays (and targets) once
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
        variables = self.model.init(rng)
        state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                 "opt_state": self.tx.init(variables["params"])}
        if "batch_stats" in variables:
            state["batch_stats"] = variables["batch_stats"]
        return state

    @staticmethod
    def step_base_key(seed: int):
        """The trainer's ``base_key``: step t of seed s uses ``fold_in(PRNGKey(s + 1), t)``."""
        return jax.random.PRNGKey(int(seed) + 1)

    def update(self, state, batch, context, base_key):
        """One training step, as the trainer's ``update``; returns ``(state, loss)``."""
        step_key = jax.random.fold_in(base_key, state["step"])
        batch = {**batch, "step": state["step"]}
        model_state = {"batch_stats": state["batch_stats"]} if "batch_stats" in state else {}
        cfg = self.objective_config

        def loss_fn(params):
            if context is None:
                return self.objective.loss(self.model, params, model_state, batch, step_key, cfg)
            return self.objective.loss(self.model, params, model_state, batch, step_key, cfg, context)

        (loss, (new_model_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state}
        if "batch_stats" in state:
            new["batch_stats"] = new_model_state["batch_stats"]
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
        from advalign_jax.training.inputs import ArrayBatches  # pylint: disable=import-outside-toplevel

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
        from advalign_jax.losses import pag_targets as T  # pylint: disable=import-outside-toplevel

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
        from advalign_jax.data.images import load_arrays  # pylint: disable=import-outside-toplevel

        a = self.config.arrays
        return load_arrays(a.source, a.test_split, a.data_dir or None, a.eval_limit if a.eval_limit > 0 else None)

    def evaluate(self, states, seeds: Sequence[int]) -> dict:
        """Per-point predictions of every seed on the test split: ``label`` (N,), ``clean_pred`` and
        ``adv_pred`` (S, N), under the trainer's evaluation attack (``config.eval_attack``)."""
        from advalign_jax.evaluation import robustness  # pylint: disable=import-outside-toplevel
        from advalign_jax.training.trainer import eval_attack_config  # pylint: disable=import-outside-toplevel

        x, y = self.held_out_arrays()
        attack_cfg, eps = eval_attack_config(self.config)
        attacks = (robustness.PGDAttack("eval", eps, attack_cfg, target=self.config.eval_attack.target),)
        index = jnp.arange(len(y), dtype=jnp.int32)
        mask = jnp.ones(len(y), bool)
        keys = jnp.stack([jax.random.PRNGKey(int(s) + 7) for s in seeds])

        x, y = jnp.asarray(x), jnp.asarray(y)

        def one(variables, key):
            out = robustness.batch_outputs(self.model.apply, variables, x, y, index, mask, key, attacks)
            return out["clean_pred"], out["eval/pred"]

        clean, adv = jax.jit(jax.vmap(one))(final_variables(states), keys)
        return {"label": np.asarray(y), "clean_pred": np.asarray(clean), "adv_pred": np.asarray(adv)}


def final_variables(states) -> dict:
    """The model variables (``params``, and ``batch_stats`` if any) of stacked train states."""
    return {k: states[k] for k in ("params", "batch_stats") if k in states}


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


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["variant", "seed", "n", *COUNTS, "final_loss", "finite"]
DISTRIBUTION_COLUMNS = ["variant", "count", "seeds", "n", "median", "q1", "q3", "min", "max"]


def _write_csv(path: str, columns: list, rows: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _read_csv(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def seed_rows(result: dict, k: int) -> list:
    """The per-point rows of seed number ``k`` of a :func:`sweep` result."""
    y, c, a = result["label"], result["clean_pred"][k], result["adv_pred"][k]
    return [{"point": i, "label": int(y[i]), "clean_pred": int(c[i]), "adv_pred": int(a[i]),
             "kept_adversarial": int(a[i] == y[i]), "kept_robust": int(a[i] == y[i] and c[i] == y[i])}
            for i in range(len(y))]


SEED_COLUMNS = ["point", "label", "clean_pred", "adv_pred", "kept_adversarial", "kept_robust"]


def _config_record(config, seeds) -> dict:
    c = json.loads(json.dumps(config.to_dict(), default=str))
    c.pop("workdir", None)
    c.pop("seed", None)
    return {"config": c, "seeds": [int(s) for s in seeds]}


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _differing_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def run_variant(config, variant: str, seeds: Sequence[int], out: str, progress: bool = True, log=print) -> list:
    """Sweeps one variant into ``out/variant/`` (or reuses a finished sweep of the same config and
    seeds there); returns its summary rows."""
    vdir = os.path.join(out, variant)
    record = _config_record(config, seeds)
    record_path = os.path.join(vdir, "config.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            saved = json.load(f)
        differ = _differing_keys(saved["config"], record["config"])
        if differ:
            raise ConfigError(f"{vdir} holds a sweep of another config (keys {', '.join(differ)}); "
                              f"use another --out")
        if saved["seeds"] == record["seeds"] and os.path.exists(os.path.join(vdir, "summary.csv")):
            log(f"{variant}: reusing {vdir}")
            return _read_csv(os.path.join(vdir, "summary.csv"))
    os.makedirs(vdir, exist_ok=True)
    for name in os.listdir(vdir):  # a sweep of other seeds: its files go, so none is mistaken for this one's
        if name.startswith("seed_") or name in ("summary.csv", "config.json"):
            os.remove(os.path.join(vdir, name))
    log(f"{variant}: training {len(seeds)} seeds x {int(config.total_steps)} steps in one program")
    result = sweep(config, seeds, progress=progress)
    rows = []
    for k, s in enumerate(result["seeds"]):
        _write_csv(os.path.join(vdir, f"seed_{s}.csv"), SEED_COLUMNS, seed_rows(result, k))
        rows.append({"variant": variant, "seed": s, "n": result["n"],
                     **{c: int(result[c][k]) for c in COUNTS},
                     "final_loss": f"{float(result['final_loss'][k]):.6g}", "finite": int(result["finite"][k])})
    _write_csv(os.path.join(vdir, "summary.csv"), SUMMARY_COLUMNS, rows)
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return rows


def distribution_rows(rows: list) -> list:
    """One row per variant and count: :func:`distribution` over the seeds."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        for count in COUNTS:
            d = distribution([int(r[count]) for r in mine])
            out.append({"variant": variant, "count": count, "seeds": d["n"], "n": int(mine[0]["n"]),
                        **{k: f"{d[k]:g}" for k in ("median", "q1", "q3", "min", "max")}})
    return out


def format_distribution(rows: list) -> str:
    lines = [f"{'variant':<10} {'count':<17} {'median':>7} {'q1':>7} {'q3':>7} {'min':>5} {'max':>5}   of"]
    for r in rows:
        lines.append(f"{r['variant']:<10} {r['count']:<17} {r['median']:>7} {r['q1']:>7} {r['q3']:>7} "
                     f"{r['min']:>5} {r['max']:>5}   {r['n']} points, {r['seeds']} seeds")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list:
    """``'16'`` -> 0..15; ``'5-20'`` -> 5..20; ``'0,3,7'`` -> those."""
    text = text.strip()
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        if "-" in text:
            lo, hi = text.split("-", 1)
            return list(range(int(lo), int(hi) + 1))
        return list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: use a count (16), a range (5-20) or a list (0,3,7)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pag_seed_sweep.py",
        description="Train many seeds of a small array-data config at once (the seeds vmapped into one "
                    "compiled program, each seed the computation `advalign-jax train --config.seed=S` runs on "
                    "one device), attack every model with the config's evaluation attack, and report the "
                    "distribution over seeds of the points kept: kept_adversarial (prediction at the "
                    "attacked point = label; the PAG paper's count) and kept_robust (also correct clean; "
                    "the trainer's eval_robust_accuracy).",
        epilog="Example: python scripts/pag_seed_sweep.py --config configs/pag_toy2d.py --variants vanilla,pag "
               "--seeds 16 --out results/pag_toy2d_seeds. Overrides --config.KEY=VALUE apply to every variant.")
    p.add_argument("--config", default="configs/pag_toy2d.py", help="config file (default: %(default)s)")
    p.add_argument("--variants", default="vanilla,pag", help="comma-separated config variants (default: %(default)s)")
    p.add_argument("--seeds", default="16", help="a count N (seeds 0..N-1), a range A-B or a list a,b,c "
                                                 "(default: %(default)s)")
    p.add_argument("--epochs", type=float, default=0.0,
                   help="train this many epochs (total_steps = epochs x steps_per_epoch); default: the config's")
    p.add_argument("--out", default="results/pag_toy2d_seeds", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from advalign_jax.config import load_config, split_overrides  # pylint: disable=import-outside-toplevel
    from advalign_jax.errors import AdvalignError  # pylint: disable=import-outside-toplevel

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_overrides(argv)
        args = build_parser().parse_args(rest)
        seeds = parse_seeds(args.seeds)
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        rows = []
        for variant in variants:
            config = load_config(f"{args.config}:{variant}", overrides)
            if args.epochs:
                config.total_steps = max(1, int(round(args.epochs * int(config.steps_per_epoch))))
            rows += run_variant(config, variant, seeds, args.out, progress=not args.no_progress)
        os.makedirs(args.out, exist_ok=True)
        _write_csv(os.path.join(args.out, "summary.csv"), SUMMARY_COLUMNS, rows)
        dist = distribution_rows(rows)
        _write_csv(os.path.join(args.out, "distribution.csv"), DISTRIBUTION_COLUMNS, dist)
        print(format_distribution(dist))
        print(f"per-seed files: {os.path.join(args.out, 'VARIANT', 'seed_S.csv')}; summary.csv and distribution.csv "
              f"in {args.out}")
        return 0
    except AdvalignError as err:
        print(f"pag_seed_sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pag_seed_sweep: interrupted (finished variants are kept; rerun to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
