"""The trainer: one loop for every objective (cross-entropy, the neural harmonizer, PAG, PGD adversarial
training, TRADES).

``advalign-jax train --config configs/<recipe>.py`` runs :func:`train`. Its parts, one module each:
the train state and step (:mod:`~advalign_jax.training.step`), the input streams
(:mod:`~advalign_jax.training.inputs`), the objectives (:mod:`~advalign_jax.training.objectives`), the
optimizers and schedules (:mod:`~advalign_jax.training.optim`), checkpoints
(:mod:`~advalign_jax.training.checkpoints`), metrics (:mod:`~advalign_jax.training.metrics_log`), the
periodic evaluation (:mod:`~advalign_jax.training.periodic_eval`) and the export
(:mod:`~advalign_jax.training.export`). This module is the loop; its sections: start-up, mesh, input
pipeline, model and optimizer, shapes and shardings, checkpoints, update step, loop.

- Data-parallel over every device of every process: the batch is a global array split along the
  ``data`` axis, the train state is replicated; BatchNorm statistics are those of the global batch.
- Checkpoints every ``checkpoint_every`` steps, keeping the last ``keep_checkpoints``, with the position
  of each process's input stream; a rerun resumes from the latest one and ends with the same
  parameters as an uninterrupted run (bitwise on the same device count): the per-step random key is
  ``fold_in(seed, step)``. A rerun over another config is refused (:mod:`advalign_jax.run_record`).
- Metrics go to ``metrics.csv`` and TensorBoard (``tensorboard/``) every ``log_every`` steps, evaluation
  rows every ``eval_every`` steps and at the end; every row of a step is written before that step's
  checkpoint (a resumed run has each row once). A non-finite loss or parameter gradient stops training
  with a message naming the step and the last good checkpoint, which is kept.
- At the end the model is written as a model directory (``workdir/model`` or ``export_to``) that every
  command loads by path.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from advalign_jax import parallel, store
from advalign_jax.errors import AdvalignError, ConfigError, OutputError
from advalign_jax.models import load_model
from advalign_jax.training import inputs, objectives, optim
from advalign_jax.training.checkpoints import Checkpoints, run_meta
from advalign_jax.training.export import export_model
from advalign_jax.training.metrics_log import MetricsLog
from advalign_jax.training.periodic_eval import eval_attack_config, make_evaluation  # noqa: F401 (public here)
from advalign_jax.training.step import build_model, init_state, train_step


class TrainingDiverged(AdvalignError):
    """The loss became non-finite."""


def train(config, progress: bool = True, stop_after: Optional[int] = None, log=print) -> dict:
    """Trains per ``config``; returns the last logged metrics (and ``eval_accuracy``).

    ``stop_after`` ends the run after that many steps of this invocation (as an interruption would),
    leaving a checkpoint to resume from; tests use it.
    """
    # ---- start-up -----------------------------------------------------------------------------------
    mesh = parallel.job_mesh(config)
    workdir = config.workdir
    writer = jax.process_index() == 0
    if not writer:  # one process speaks for the run
        log = lambda *args, **kwargs: None  # noqa: E731
    objective = objectives.get(config.objective.name)
    export = config.export_to or os.path.join(workdir, "model")
    if writer and os.path.exists(export) and not os.path.isdir(export):
        raise OutputError(f"cannot write the model to {export}: it is a file; use another --config.export_to")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise OutputError(f"cannot write into {workdir}: it is a file, not a directory; use another "
                          "--config.workdir")
    locks: list = []  # the workdir lock, taken once the config and data are known to be good
    try:
        return _train(config, mesh, progress, stop_after, log, writer, objective, export, locks)
    finally:
        for lock in locks:
            lock.release()


def _train(config, mesh, progress, stop_after, log, writer, objective, export, locks) -> dict:
    workdir = config.workdir
    # ---- mesh ---------------------------------------------------------------------------------------
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
    if hasattr(objective, "validate"):  # the objective's config mistakes, before anything is written
        objective.validate(config, model)
    total_steps = int(config.total_steps)
    if total_steps < 1:
        raise ConfigError(f"total_steps must be at least 1, got {total_steps}")
    lr = optim.schedule(config.schedule, int(config.steps_per_epoch), total_steps)
    tx = optim.optimizer(config.optimizer, lr, model.variable_shapes()["params"])
    init = functools.partial(init_state, model, tx)

    # ---- shapes and shardings -------------------------------------------------------------------------
    rng = jax.random.PRNGKey(int(config.seed))
    replicated = parallel.replicated(mesh)
    abstract_state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                  jax.eval_shape(init, rng))

    # ---- input pipeline and checkpoints: resume or start ------------------------------------------------
    train_input = inputs.make(config.data_kind, config, per_process_batch)
    if writer:
        locks.append(store.WorkdirLock(workdir))  # one run per workdir, released when this process ends
    checkpoints = Checkpoints(workdir, int(config.keep_checkpoints), log)
    meta = run_meta(config, model)
    state, latest = checkpoints.restore(meta, abstract_state, train_input)
    if state is not None:
        log(f"resumed from step {latest} ({checkpoints.folder})")
    else:
        state = jax.jit(init, out_shardings=replicated)(rng)
        if config.model.init_from:
            state = _fine_tune_from(config, state, tx, mesh, replicated)
            log(f"fine-tuning from {config.model.init_from}")
    start_step = int(parallel.replicated_to_host(state["step"]))
    metrics_log = MetricsLog(workdir, start_step, writer)
    if start_step >= total_steps:  # a finished run: nothing to train, nothing to log again
        log(f"already trained to step {start_step} (total_steps {total_steps}) in {workdir}")
        if writer and not os.path.isdir(export):
            export_model(config, state, export, workdir)
        return {**metrics_log.last_values(), "export": export}
    evaluate = make_evaluation(config, model, mesh)

    # ---- update step --------------------------------------------------------------------------------
    base_key = jax.random.PRNGKey(int(config.seed) + 1)
    # Per-run constants of the objective (PAG's class representatives or NN sample set), placed on
    # every device once and passed to the step as an argument (not baked into the program).
    context = objective.prepare(config, train_input) if hasattr(objective, "prepare") else None
    context = parallel.replicate(context, mesh) if context else None

    def update(state, batch, context):
        new, _, metrics = train_step(model, objective, config.objective, tx, lr, state, batch, context, base_key)
        return new, metrics

    update_step = jax.jit(update, donate_argnums=(0,), out_shardings=(replicated, replicated))

    # ---- loop ---------------------------------------------------------------------------------------
    loop = _Loop(metrics_log, checkpoints, latest, workdir)
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not (progress and writer),
               file=sys.stderr)
    step, ran, final_evaluation = start_step, 0, {}
    try:
        while step < total_steps:
            if stop_after is not None and ran >= stop_after:
                break
            state, metrics = update_step(state, parallel.shard_batch(next(train_input), mesh), context)
            if one_step_in_flight:
                jax.block_until_ready(metrics)
            loop.pending.append(metrics)
            step += 1
            ran += 1
            bar.update(1)
            if step % int(config.log_every) == 0 or step == total_steps or step % int(config.checkpoint_every) == 0:
                loop.flush(step, bar)  # checks for a non-finite loss before anything is saved
            # Every row of a step is written before the checkpoint of that step: a run killed after the
            # checkpoint resumes past the step and would never write a missing row again.
            if step == total_steps or (config.eval_every and step % int(config.eval_every) == 0):
                evaluation = evaluate(state)
                if evaluation:
                    metrics_log.write(step, evaluation)
                    if step == total_steps:
                        final_evaluation = evaluation
            if step % int(config.checkpoint_every) == 0 or step == total_steps:
                checkpoints.save(step, state, meta, train_input)
                loop.last_good = step
    finally:
        bar.close()  # error lines start on a line of their own
    loop.flush(step, bar)
    if step < total_steps:  # interrupted on purpose (stop_after): keep the checkpoint, no export
        if loop.last_good != step:
            checkpoints.save(step, state, meta, train_input)
        return loop.last_values
    loop.last_values.update(final_evaluation)
    if writer:
        export_model(config, state, export, workdir)
        loop.last_values["export"] = export
    return loop.last_values


def _fine_tune_from(config, state, tx, mesh, replicated):
    """The initial state with the parameters (and BatchNorm statistics) of ``model.init_from``."""
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
    return state


class _Loop:
    """The loop's bookkeeping: the device metrics since the last log, the last good checkpoint, the last
    logged values; :meth:`flush` logs (and checks) the pending steps."""

    def __init__(self, metrics_log: MetricsLog, checkpoints: Checkpoints, last_good, workdir: str):
        self.metrics_log, self.checkpoints, self.last_good, self.workdir = metrics_log, checkpoints, last_good, workdir
        self.pending: list = []
        self.last_values: dict = {}
        self.last_flush = time.perf_counter()

    def flush(self, step_now: int, bar) -> None:
        if not self.pending:
            return
        host = parallel.replicated_to_host(self.pending)
        losses = np.array([float(m["loss"]) for m in host])
        grad_norms = np.array([float(m["grad_norm"]) for m in host])
        finite = np.isfinite(losses) & np.isfinite(grad_norms)
        if not np.all(finite):
            first = int(np.argmin(finite))
            bad = step_now - len(host) + 1 + first
            what = (f"the loss became {losses[first]}" if not np.isfinite(losses[first])
                    else f"the gradient became non-finite (norm {grad_norms[first]}) with a finite loss")
            where = (f"the last good checkpoint is step {self.last_good} in {self.checkpoints.folder}"
                     if self.last_good is not None else "no checkpoint was written yet")
            raise TrainingDiverged(f"{what} at step {bad}; {where}; lower schedule.base_lr or check the data")
        values = {k: float(np.mean([float(m[k]) for m in host])) for k in host[0]}
        now = time.perf_counter()
        values["step_time_s"] = (now - self.last_flush) / len(host)  # wall time per step, input included
        self.last_flush = now
        self.metrics_log.write(step_now, values)
        self.last_values = values
        self.pending = []
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.3g}")
