"""The trainer: one loop for every objective (cross-entropy, the neural harmonizer, PAG).

``advalign-jax train --config configs/<recipe>.py`` runs :func:`train`. Sections: start-up, mesh,
input pipeline, model and optimizer, shapes and shardings, update step, checkpoints, evaluation, loop.

- Data-parallel over every device of every process: the batch is a global array split along the
  ``data`` axis, the train state is replicated; BatchNorm statistics are those of the global batch.
- Checkpoints (orbax) every ``checkpoint_every`` steps, keeping the last ``keep_checkpoints``, with the
  position of each process's input stream; a rerun resumes from the latest one and ends with the same
  parameters as an uninterrupted run (bitwise on the same device count): the per-step random key is
  ``fold_in(seed, step)``.
- Metrics go to ``metrics.csv`` and TensorBoard (``tensorboard/``) every ``log_every`` steps; a
  non-finite loss or parameter gradient stops training with a message naming the step and the last good checkpoint, which
  is kept.
- At the end the model is written as a model directory (``workdir/model`` or ``export_to``) that every
  command loads by path.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advalign_jax import parallel
from advalign_jax.errors import AdvalignError, ConfigError
from advalign_jax.training import objectives, optim


class TrainingDiverged(AdvalignError):
    """The loss became non-finite."""


# ---------------------------------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------------------------------


def make_train_input(config, per_process_batch: int):
    """The training stream named by ``config.data_kind`` (a checkpointable iterator of NumPy batches)."""
    kind = config.data_kind
    if kind == "clickme":
        from advalign_jax.data.config_block import reader_config  # pylint: disable=import-outside-toplevel
        from advalign_jax.data.reader import ClickMeReader  # pylint: disable=import-outside-toplevel

        return ClickMeReader(reader_config(config.data, per_process_batch=per_process_batch)).train_batches()
    from advalign_jax.training import inputs  # pylint: disable=import-outside-toplevel

    return inputs.make(kind, config, per_process_batch)


# ---------------------------------------------------------------------------------------------------
# Metrics files
# ---------------------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.csv`` (one row per logged step, columns grow as new metrics appear) + TensorBoard."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.csv")
        self.rows: list[dict] = []
        self.writer = None
        if not enabled:
            return
        if os.path.exists(self.path):  # drop rows after the step we resume from (no duplicates)
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]
            self._rewrite()
        from advalign_jax.data.tf_env import import_tf  # pylint: disable=import-outside-toplevel

        tf = import_tf()
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def _rewrite(self):
        columns = ["step"] + sorted({k for r in self.rows for k in r} - {"step"})
        with open(self.path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(self.path + ".tmp", self.path)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.rows.append({"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})
        self._rewrite()
        from advalign_jax.data.tf_env import import_tf  # pylint: disable=import-outside-toplevel

        tf = import_tf()
        with self.writer.as_default(step=step):
            for k, v in values.items():
                tf.summary.scalar(k, v)
        self.writer.flush()


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def _manager(workdir: str, config):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    options = ocp.CheckpointManagerOptions(max_to_keep=int(config.keep_checkpoints), create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                                 item_names=("state", "meta"))


def _data_state_prefix(workdir: str, step: int) -> str:
    return os.path.join(os.path.abspath(workdir), "data_state", str(step), f"process_{jax.process_index()}")


def run_meta(config, model) -> dict:
    """What a checkpoint must agree with to be resumed by this config."""
    return {"arch": model.name, "num_classes": model.num_classes,
            "model_options": json.loads(json.dumps(config.model.options.to_dict())),
            "optimizer": config.optimizer.name, "objective": config.objective.name}


def _check_meta(saved: dict, current: dict, path: str) -> None:
    for key in ("arch", "num_classes", "model_options", "optimizer", "objective"):
        if saved.get(key) != current.get(key):
            raise AdvalignError(f"{path} holds a checkpoint with {key} {saved.get(key)!r}, but this config has "
                                f"{current.get(key)!r}; use another --config.workdir to start afresh")


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def clean_accuracy(model, variables, eval_block, mesh) -> float:
    """Top-1 accuracy over an eval data block (padded batches masked out)."""
    from advalign_jax.data.config_block import reader_config  # pylint: disable=import-outside-toplevel
    from advalign_jax.data.reader import ClickMeReader  # pylint: disable=import-outside-toplevel

    per_process = max(1, int(eval_block.batch_size) // jax.process_count())
    n_data = parallel.data_parallel_size(mesh)
    per_process = math.ceil(per_process * jax.process_count() / n_data) * n_data // jax.process_count()
    reader = ClickMeReader(reader_config(eval_block, per_process_batch=per_process))
    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x), axis=-1))
    hits = total = 0
    for batch in reader:
        g = parallel.shard_batch({"image": batch["image"]}, mesh)
        pred = parallel.to_host(predict(variables, g["image"]))
        meta = parallel.to_host({"mask": batch["mask"], "label": batch["label"]})
        hits += int(np.sum((pred == meta["label"]) & meta["mask"]))
        total += int(np.sum(meta["mask"]))
    return hits / max(total, 1)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def build_model(config):
    from advalign_jax.models import get_model  # pylint: disable=import-outside-toplevel

    options = config.model.options.to_dict()
    return get_model(config.model.name, **options, dtype=config.dtype, remat=bool(config.remat))


def train(config, progress: bool = True, stop_after: Optional[int] = None, log=print) -> dict:
    """Trains per ``config``; returns the last logged metrics (and ``eval_accuracy``).

    ``stop_after`` ends the run after that many steps of this invocation (as an interruption would),
    leaving a checkpoint to resume from; tests use it.
    """
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    from advalign_jax.models import load_model, save_model  # pylint: disable=import-outside-toplevel

    # ---- start-up -----------------------------------------------------------------------------------
    parallel.initialize_distributed(bool(config.distributed))
    workdir = config.workdir
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(workdir, exist_ok=True)
    objective = objectives.get(config.objective.name)

    # ---- mesh ---------------------------------------------------------------------------------------
    mesh = parallel.make_mesh(devices=jax.devices()[:config.num_devices] if config.num_devices else None)
    # Several CPU devices share one thread pool: with steps dispatched ahead, a device can wait in a
    # step's all-reduce while the threads it needs run the next step's programs (XLA:CPU then aborts
    # after 40 s). One step in flight on CPU avoids it; accelerators keep asynchronous dispatch.
    one_step_in_flight = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
    global_batch = int(config.data.batch_size)
    try:
        parallel.check_batch_size(global_batch, mesh, key="data.batch_size")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    per_process_batch = global_batch // jax.process_count()

    # ---- model and optimizer --------------------------------------------------------------------------
    model = build_model(config)
    total_steps = int(config.total_steps)
    if total_steps < 1:
        raise ConfigError(f"total_steps must be at least 1, got {total_steps}")
    lr = optim.schedule(config.schedule, int(config.steps_per_epoch), total_steps)
    abstract_vars = model.variable_shapes()
    tx = optim.optimizer(config.optimizer, lr, abstract_vars["params"])

    def init_state(rng):
        variables = model.init(rng)
        state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                 "opt_state": tx.init(variables["params"])}
        if "batch_stats" in variables:
            state["batch_stats"] = variables["batch_stats"]
        return state

    # ---- shapes and shardings -------------------------------------------------------------------------
    rng = jax.random.PRNGKey(int(config.seed))
    replicated = parallel.replicated(mesh)
    abstract_state = jax.eval_shape(init_state, rng)
    abstract_state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                  abstract_state)

    # ---- checkpoints: resume or start -------------------------------------------------------------------
    manager = _manager(workdir, config)
    meta = run_meta(config, model)
    train_input = make_train_input(config, per_process_batch)
    latest = manager.latest_step()
    if latest is not None:
        saved = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        _check_meta(saved, meta, os.path.join(workdir, "checkpoints"))
        state = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        train_input.restore(_data_state_prefix(workdir, latest))
        log(f"resumed from step {latest} ({os.path.join(workdir, 'checkpoints')})")
    else:
        state = jax.jit(init_state, out_shardings=replicated)(rng)
        if config.model.init_from:
            start_model, start_vars = load_model(config.model.init_from, arch=config.model.name)
            for key in ("params", "batch_stats"):
                if key in state:
                    want = jax.tree.map(lambda a: a.shape, state[key])
                    have = jax.tree.map(lambda a: np.shape(a), start_vars.get(key, {}))
                    if want != have:
                        raise AdvalignError(f"{config.model.init_from} does not fit config.model "
                                            f"({start_model.name}, {start_model.num_classes} classes)")
                    state[key] = parallel.replicate(start_vars[key], mesh)
            state["opt_state"] = jax.jit(tx.init, out_shardings=replicated)(state["params"])
            log(f"fine-tuning from {config.model.init_from}")
    start_step = int(state["step"])
    metrics_log = MetricsLog(workdir, start_step, writer)

    # ---- update step --------------------------------------------------------------------------------
    base_key = jax.random.PRNGKey(int(config.seed) + 1)

    # Per-run constants of the objective (PAG's class representatives or NN sample set), placed on
    # every device once and passed to the step as an argument (not baked into the program).
    context = objective.prepare(config, train_input) if hasattr(objective, "prepare") else None
    context = parallel.replicate(context, mesh) if context else None

    def update(state, batch, context):
        step_key = jax.random.fold_in(base_key, state["step"])
        batch = {**batch, "step": state["step"]}  # objectives with step-dependent weights read it
        model_state = {"batch_stats": state["batch_stats"]} if "batch_stats" in state else {}

        def loss_fn(params):
            if context is None:
                return objective.loss(model, params, model_state, batch, step_key, config.objective)
            return objective.loss(model, params, model_state, batch, step_key, config.objective, context)

        (loss, (new_model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state}
        if "batch_stats" in state:
            new["batch_stats"] = new_model_state["batch_stats"]
        metrics = {**metrics, "learning_rate": lr(state["step"]), "grad_norm": optax.global_norm(grads)}
        return new, metrics

    update_step = jax.jit(update, donate_argnums=(0,), out_shardings=(replicated, replicated))

    # ---- loop ---------------------------------------------------------------------------------------
    pending: list = []  # device metrics since the last log
    last_good = latest
    last_values: dict = {}
    last_flush = [time.perf_counter()]
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not (progress and writer),
               file=sys.stderr)
    step = start_step
    ran = 0

    def flush(step_now: int):
        nonlocal pending, last_values
        if not pending:
            return
        host = jax.device_get(pending)
        losses = np.array([float(m["loss"]) for m in host])
        grad_norms = np.array([float(m["grad_norm"]) for m in host])
        finite = np.isfinite(losses) & np.isfinite(grad_norms)
        if not np.all(finite):
            first = int(np.argmin(finite))
            bad = step_now - len(host) + 1 + first
            what = (f"the loss became {losses[first]}" if not np.isfinite(losses[first])
                    else f"the gradient became non-finite (norm {grad_norms[first]}) with a finite loss")
            where = (f"the last good checkpoint is step {last_good} in {os.path.join(workdir, 'checkpoints')}"
                     if last_good is not None else "no checkpoint was written yet")
            raise TrainingDiverged(f"{what} at step {bad}; {where}; lower schedule.base_lr or check the data")
        values = {k: float(np.mean([float(m[k]) for m in host])) for k in host[0]}
        now = time.perf_counter()
        values["step_time_s"] = (now - last_flush[0]) / len(host)  # wall time per step, input included
        last_flush[0] = now
        metrics_log.write(step_now, values)
        last_values = values
        pending = []
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.3g}")

    while step < total_steps:
        if stop_after is not None and ran >= stop_after:
            break
        batch = next(train_input)
        global_batch_arrays = parallel.shard_batch(batch, mesh)
        state, metrics = update_step(state, global_batch_arrays, context)
        if one_step_in_flight:
            jax.block_until_ready(metrics)
        pending.append(metrics)
        step += 1
        ran += 1
        bar.update(1)
        if step % int(config.log_every) == 0 or step == total_steps or step % int(config.checkpoint_every) == 0:
            flush(step)  # checks for a non-finite loss before anything is saved
        if step % int(config.checkpoint_every) == 0 or step == total_steps:
            _save(manager, workdir, step, state, meta, train_input)
            last_good = step
        if config.eval_every and step % int(config.eval_every) == 0 and step < total_steps:
            evaluation = _evaluate(config, model, state, mesh)
            if evaluation:
                metrics_log.write(step, evaluation)
    bar.close()
    flush(step)
    if step < total_steps:  # interrupted on purpose (stop_after): keep the checkpoint, no export
        if last_good != step:
            _save(manager, workdir, step, state, meta, train_input)
        return last_values
    evaluation = _evaluate(config, model, state, mesh)
    if evaluation:
        metrics_log.write(step, evaluation)
        last_values.update(evaluation)
    if writer:
        export = config.export_to or os.path.join(workdir, "model")
        final = final_variables(state)
        from advalign_jax.models import get_model  # pylint: disable=import-outside-toplevel

        plain = get_model(config.model.name, **config.model.options.to_dict())
        save_model(export, plain, final, source=f"trained: {os.path.abspath(workdir)}", overwrite=True)
        last_values["export"] = export
    return last_values


def final_variables(state) -> dict:
    out = {"params": jax.device_get(state["params"])}
    if "batch_stats" in state:
        out["batch_stats"] = jax.device_get(state["batch_stats"])
    return out


def _evaluate(config, model, state, mesh) -> dict:
    """Evaluation metrics of the current state: clean accuracy on ``eval_data`` (ClickMe) or, for
    array data, clean and robust accuracy on the test split (``eval_attack``)."""
    variables = {"params": state["params"]}
    if "batch_stats" in state:
        variables["batch_stats"] = state["batch_stats"]
    if config.data_kind == "arrays":
        return array_robust_accuracy(config, model, variables, mesh)
    if not config.eval_data.files:
        return {}
    return {"eval_accuracy": clean_accuracy(model, variables, config.eval_data, mesh)}


def eval_attack_config(c):
    """The PGDConfig and radius of the ``eval_attack`` block."""
    from advalign_jax.attacks.pgd import PGDConfig  # pylint: disable=import-outside-toplevel

    a = c.eval_attack
    cfg = PGDConfig(norm=a.norm, steps=int(a.steps), step_size=float(a.step_size), relative_step=bool(a.relative_step),
                    projection="ball", random_start=a.random_start,
                    start_radius=float(a.start_radius) if a.start_radius else None,
                    targeted=a.target != "none", clip=tuple(a.clip) if len(a.clip) else None)
    return cfg, float(a.eps)


@functools.lru_cache(maxsize=2)
def _held_out_arrays(source, split, data_dir, limit):
    """The evaluation split, read once per run rather than at every evaluation."""
    from advalign_jax.data.images import load_arrays  # pylint: disable=import-outside-toplevel

    return load_arrays(source, split, data_dir, limit)


def array_robust_accuracy(config, model, variables, mesh, batch_size: int = 256) -> dict:
    """Clean and robust accuracy on the test split of ``config.arrays`` under ``config.eval_attack``
    (:func:`advalign_jax.evaluation.robustness.epoch_metrics`; a targeted attack aims at class
    ``(y + 1) mod C``, the other class of a binary task; robust means correct clean and attacked)."""
    from advalign_jax.evaluation.robustness import PGDAttack, epoch_metrics  # pylint: disable=import-outside-toplevel

    a = config.arrays
    x, y = _held_out_arrays(a.source, a.test_split, a.data_dir or None, a.eval_limit if a.eval_limit > 0 else None)
    attack, eps = eval_attack_config(config)
    attacks = [PGDAttack("eval", eps, attack, target=config.eval_attack.target)]
    return epoch_metrics(model.apply, variables, x, y, attacks, mesh=mesh, batch_size=batch_size, key=jax.random.PRNGKey(int(config.seed) + 7))


def _save(manager, workdir, step, state, meta, train_input) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)
    manager.wait_until_finished()
    prefix = _data_state_prefix(workdir, step)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    train_input.save(prefix)
    kept = {str(s) for s in manager.all_steps()}
    root = os.path.join(os.path.abspath(workdir), "data_state")
    if jax.process_index() == 0:
        for name in os.listdir(root):
            if name not in kept:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

