"""The trainer: one loop for every objective (cross-entropy, the neural harmonizer, PAG).

``advalign-jax train --config configs/<recipe>.py`` runs :func:`train`. Sections: start-up, mesh,
input pipeline, model and optimizer, shapes and shardings, update step, checkpoints, evaluation, loop.

- Data-parallel over every device of every process: the batch is a global array split along the
  ``data`` axis, the train state is replicated; BatchNorm statistics are those of the global batch.
- Checkpoints (orbax) every ``checkpoint_every`` steps, keeping the last ``keep_checkpoints``, with the
  position of each process's input stream; a rerun resumes from the latest one and ends with the same
  parameters as an uninterrupted run (bitwise on the same device count): the per-step random key is
  ``fold_in(seed, step)``.
- Metrics go to ``metrics.csv`` and TensorBoard (``tensorboard/``) every ``log_every`` steps, evaluation
  rows every ``eval_every`` steps and at the end; every row of a step is written before that step's
  checkpoint (a resumed run has each row once). A non-finite loss or parameter gradient stops training
  with a message naming the step and the last good checkpoint, which is kept.
- At the end the model is written as a model directory (``workdir/model`` or ``export_to``) that every
  command loads by path.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
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

from advalign_jax import faults, parallel, store
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
    """``metrics.csv`` (one row per logged step) + TensorBoard.

    Rows are appended as whole lines (synced); the file is rewritten only when a new metric adds a
    column or, on resume, when rows logged after the checkpoint being resumed must go (so a resumed run
    has each step once) or a torn last line must go.
    """

    def __init__(self, workdir: str, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.csv")
        self.columns: list[str] = ["step"]
        self.writer = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            whole = data[:data.rfind(b"\n") + 1].decode(errors="replace")
            rows = list(csv.DictReader(io.StringIO(whole)))
            keep = [r for r in rows if _step_of(r) is not None and _step_of(r) <= resume_step]
            self.columns = list(csv.DictReader(io.StringIO(whole)).fieldnames or ["step"])
            if len(keep) != len(rows) or len(whole) != len(data):
                store.write_csv(self.path, self.columns, keep)
        self.writer = EventFile(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: f"{v:.6g}" for k, v in values.items()}}
        new = [k for k in sorted(values) if k not in self.columns]
        if new or not os.path.exists(self.path):
            old = store.read_csv(self.path) if os.path.exists(self.path) else []
            self.columns = self.columns + new
            store.write_csv(self.path, self.columns, [*old, row])
        else:
            with store.writing(self.path), open(self.path, "a", newline="") as f:
                f.write(store.csv_text([[row.get(c, "") for c in self.columns]]))
                f.flush()
                os.fsync(f.fileno())
        self.writer.scalars(step, values)

    def last_values(self) -> dict:
        rows = store.read_csv(self.path) if self.enabled else []
        out = {}
        for r in rows:
            out.update({k: float(v) for k, v in r.items() if k != "step" and v not in ("", None)})
        return out


class EventFile:
    """A TensorBoard event file of scalars, written with TensorBoard's record format and protos only (no
    TensorFlow import, so array-data runs start without it): ``events.out.tfevents.TIME.HOST.PID``, one
    ``Event`` per logged step, flushed."""

    def __init__(self, folder: str):
        import socket  # pylint: disable=import-outside-toplevel

        from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
        from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=import-outside-toplevel

        store.make_dirs(folder)
        self.path = os.path.join(folder, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                                         f"{os.getpid()}")
        with store.writing(self.path):
            self._file = open(self.path, "ab")  # pylint: disable=consider-using-with
            self._records = RecordWriter(self._file)
            self._records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
                                .SerializeToString())
            self._records.flush()

    def scalars(self, step: int, values: dict) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items()])
        with store.writing(self.path):
            self._records.write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
                                .SerializeToString())
            self._records.flush()


def _step_of(row: dict):
    try:
        return int(float(row["step"]))
    except (KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def _manager(workdir: str, config):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    options = ocp.CheckpointManagerOptions(max_to_keep=int(config.keep_checkpoints), create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                                 item_names=("state", "meta"))


# Keys that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_CHANGES = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "workdir",
                     "export_to", "num_devices", "distributed")
# Config keys added after workdirs were written, each with the value that computes what such a workdir
# computed: a checkpoint whose saved config lacks the key resumes when the current value is this one.
ADDED_KEYS = {"objective.differentiation": "auto"}  # either order computes the same loss and gradient


def _data_state_dir(workdir: str, step: int, process: Optional[int] = None) -> str:
    p = jax.process_index() if process is None else process
    return os.path.join(os.path.abspath(workdir), "data_state", str(step), f"process_{p}")


def _data_state_prefix(workdir: str, step: int) -> Optional[str]:
    """This process's saved input-stream position of checkpoint ``step`` (None if it was never
    completed). The position is a folder renamed into place once written, so it exists whole or not at all."""
    folder = _data_state_dir(workdir, step)
    if os.path.isdir(folder):
        return os.path.join(folder, "state")
    legacy = folder  # earlier layout: files data_state/STEP/process_I.json / .index beside each other
    if os.path.exists(legacy + ".json") or os.path.exists(legacy + ".index"):
        return legacy
    return None


def run_meta(config, model) -> dict:
    """What a checkpoint must agree with to be resumed by this config: the architecture, and every
    config value except :data:`RESUMABLE_CHANGES`."""
    full = json.loads(json.dumps(config.to_dict(), default=str))
    return {"arch": model.name, "num_classes": model.num_classes,
            "model_options": json.loads(json.dumps(config.model.options.to_dict())),
            "optimizer": config.optimizer.name, "objective": config.objective.name,
            "config": {k: v for k, v in full.items() if k not in RESUMABLE_CHANGES},
            "process_count": jax.process_count()}


def _check_meta(saved: dict, current: dict, path: str) -> None:
    for key in ("arch", "num_classes", "model_options", "optimizer", "objective"):
        if saved.get(key) != current.get(key):
            raise AdvalignError(f"{path} holds a checkpoint with {key} {saved.get(key)!r}, but this config has "
                                f"{current.get(key)!r}; use another --config.workdir to start afresh")
    if "config" in saved:
        changed = [k for k in store.differences(saved["config"], current["config"])
                   if not _added_with_default(saved["config"], current["config"], k)]
        if changed:
            shown = "; ".join(store.first_difference(_get(saved["config"], k), _get(current["config"], k), k)
                              for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise AdvalignError(f"{path} holds a run of another configuration ({shown}{more}); only "
                                f"{', '.join(RESUMABLE_CHANGES)} may change on resume; use another "
                                "--config.workdir to start afresh")
    saved_count = saved.get("process_count", 1)
    if saved_count != current.get("process_count", 1):
        raise AdvalignError(f"{path} was written by {saved_count} process(es) and this run has "
                            f"{current.get('process_count', 1)}; each process's input-stream position is its own, "
                            f"so resume with {saved_count} process(es) or use another --config.workdir")


_MISSING = object()


def _added_with_default(saved: dict, current: dict, dotted: str) -> bool:
    """True for a key of :data:`ADDED_KEYS` that the saved config lacks and the current one holds at its
    default (the run is unchanged)."""
    return (dotted in ADDED_KEYS and _get(saved, dotted, _MISSING) is _MISSING
            and _get(current, dotted, _MISSING) == ADDED_KEYS[dotted])


def _get(tree: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


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
    # ---- start-up -----------------------------------------------------------------------------------
    parallel.initialize_distributed(bool(config.distributed))
    workdir = config.workdir
    writer = jax.process_index() == 0
    if not writer:  # one process speaks for the run
        log = lambda *args, **kwargs: None  # noqa: E731
    objective = objectives.get(config.objective.name)
    export = config.export_to or os.path.join(workdir, "model")
    if writer and os.path.exists(export) and not os.path.isdir(export):
        raise store.OutputError(f"cannot write the model to {export}: it is a file; use another --config.export_to")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise store.OutputError(f"cannot write into {workdir}: it is a file, not a directory; use another "
                                "--config.workdir")
    locks: list = []  # the workdir lock, taken once the config and data are known to be good
    try:
        return _train(config, progress, stop_after, log, workdir, writer, objective, export, locks)
    finally:
        for lock in locks:
            lock.release()


def _train(config, progress, stop_after, log, workdir, writer, objective, export, locks) -> dict:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    from advalign_jax.models import load_model  # pylint: disable=import-outside-toplevel

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
    train_input = make_train_input(config, per_process_batch)
    if writer:
        locks.append(store.WorkdirLock(workdir))  # one run per workdir, released when this process ends
    try:
        manager = _manager(workdir, config)
    except Exception as err:  # pylint: disable=broad-except
        os_err = store.os_error_in(err)
        if os_err is None:
            raise
        raise store.output_error(os.path.join(workdir, "checkpoints"), os_err) from None
    meta = run_meta(config, model)
    latest = _restorable_step(manager, workdir, log)
    state = None
    if latest is not None:
        state, latest = _restore_newest_readable(manager, workdir, latest, meta, abstract_state, train_input, log)
    if state is not None:
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
    start_step = int(parallel.replicated_to_host(state["step"]))
    metrics_log = MetricsLog(workdir, start_step, writer)
    if start_step >= total_steps:  # a finished run: nothing to train, nothing to log again
        log(f"already trained to step {start_step} (total_steps {total_steps}) in {workdir}")
        if writer and not os.path.isdir(export):
            _export(config, state, export, workdir)
        return {**metrics_log.last_values(), "export": export}

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
    final_evaluation: dict = {}
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
        host = parallel.replicated_to_host(pending)
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

    try:
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
            # Every row of a step is written before the checkpoint of that step: a run killed after the
            # checkpoint resumes past the step and would never write a missing row again.
            if step == total_steps or (config.eval_every and step % int(config.eval_every) == 0):
                evaluation = _evaluate(config, model, state, mesh)
                if evaluation:
                    metrics_log.write(step, evaluation)
                    if step == total_steps:
                        final_evaluation = evaluation
            if step % int(config.checkpoint_every) == 0 or step == total_steps:
                _save(manager, workdir, step, state, meta, train_input)
                last_good = step
    finally:
        bar.close()  # error lines start on a line of their own
    flush(step)
    if step < total_steps:  # interrupted on purpose (stop_after): keep the checkpoint, no export
        if last_good != step:
            _save(manager, workdir, step, state, meta, train_input)
        return last_values
    last_values.update(final_evaluation)
    if writer:
        _export(config, state, export, workdir)
        last_values["export"] = export
    return last_values


def _export(config, state, export: str, workdir: str) -> None:
    from advalign_jax.models import get_model, save_model  # pylint: disable=import-outside-toplevel

    plain = get_model(config.model.name, **config.model.options.to_dict())
    with store.writing(export):
        save_model(export, plain, final_variables(state), source=f"trained: {os.path.abspath(workdir)}",
                   overwrite=True)


def final_variables(state) -> dict:
    out = {"params": parallel.replicated_to_host(state["params"])}
    if "batch_stats" in state:
        out["batch_stats"] = parallel.replicated_to_host(state["batch_stats"])
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
    """Checkpoint ``step``: the input-stream position first (a folder renamed into place), then the
    orbax checkpoint (written beside and renamed by orbax). A restore needs both, so a kill at any
    moment leaves the previous checkpoint complete."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    folder = _data_state_dir(workdir, step)
    tmp = f"{folder}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        train_input.save(os.path.join(tmp, "state"))
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise store.output_error(folder, err) from None
    faults.crash_point("checkpoint.data_state")
    try:
        with store.quiet_library_errors(on_failure=manager.close):  # one line says what failed
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)
            manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
        os_err = store.os_error_in(err)
        if os_err is None:
            raise
        raise store.output_error(os.path.join(workdir, "checkpoints"), os_err) from None
    faults.crash_point("checkpoint.saved")
    _prune_data_states(workdir, manager)


def _prune_data_states(workdir: str, manager) -> None:
    """Removes this process's input-stream positions of checkpoints orbax no longer keeps."""
    kept = {str(s) for s in manager.all_steps()}
    root = os.path.join(os.path.abspath(workdir), "data_state")
    if not os.path.isdir(root):
        return
    mine = f"process_{jax.process_index()}"
    for name in os.listdir(root):
        if name in kept or not os.path.isdir(os.path.join(root, name)):
            continue
        for entry in os.listdir(os.path.join(root, name)):
            if entry == mine or entry.startswith(mine + ".") or entry.startswith(mine + "-"):
                target = os.path.join(root, name, entry)
                if os.path.isdir(target):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(target)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(root, name))  # empty once every process removed its own


# Errors of this program or of the user, not of a checkpoint's files: never taken for a damaged checkpoint.
_NOT_DAMAGE = (AdvalignError, NameError, AttributeError, ImportError, AssertionError, MemoryError)


def _restore_newest_readable(manager, workdir: str, first: int, meta: dict, abstract_state, train_input, log):
    """Restores checkpoint ``first`` (its run metadata checked against ``meta``, its state, this
    process's input-stream position) and returns ``(state, step)``. Where a checkpoint's files cannot be
    read (a damaged disk, a truncated file), it is moved to ``checkpoints_unreadable/`` with a one-line
    warning and the newest older complete checkpoint is tried; ``(None, None)`` when none is left (the
    run starts afresh). A config that does not match a checkpoint is never skipped. In a run of several
    processes an unreadable checkpoint stops the run in one line instead (the processes must agree)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    folder = os.path.join(workdir, "checkpoints")
    candidates = [s for s in sorted(manager.all_steps(), reverse=True)
                  if s <= first and _data_state_prefix(workdir, s) is not None]
    for i, step in enumerate(candidates):
        try:
            saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            _check_meta(saved, meta, folder)  # a ConfigError: never skipped
            state = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
            train_input.restore(_data_state_prefix(workdir, step))
            return state, step
        except _NOT_DAMAGE:
            raise
        except Exception as err:  # pylint: disable=broad-except  # the checkpoint's files cannot be read
            failure = err
        reason = f"{type(failure).__name__}: {(str(failure).strip().splitlines() or [''])[0][:200]}"
        if jax.process_count() > 1:
            raise AdvalignError(f"checkpoint {step} in {folder} cannot be read ({reason}); move it out of {folder} "
                                "and rerun to resume from an older one")
        aside = os.path.join(workdir, "checkpoints_unreadable", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            store.make_dirs(aside)
            os.replace(os.path.join(folder, str(step)), os.path.join(aside, "checkpoint"))
            data_state = os.path.dirname(_data_state_dir(workdir, step))
            if os.path.isdir(data_state):
                os.replace(data_state, os.path.join(aside, "data_state"))
        except OSError as err:
            raise AdvalignError(f"checkpoint {step} in {folder} cannot be read ({reason}) nor moved aside "
                                f"({err.strerror}); move it out of {folder} and rerun") from None
        if getattr(manager, "reload", None) is not None:
            manager.reload()
        older = candidates[i + 1] if i + 1 < len(candidates) else None
        log(f"warning: checkpoint {step} in {folder} cannot be read ({reason}); moved to {aside}; "
            + (f"resuming from step {older}" if older is not None else "starting afresh"))
    return None, None


def _restorable_step(manager, workdir: str, log) -> Optional[int]:
    """The newest checkpoint whose input-stream position was written by every process (the same step
    on every process); newer incomplete ones are removed with a one-line warning."""
    steps = sorted(manager.all_steps(), reverse=True)
    have = np.array([s if _data_state_prefix(workdir, s) is not None else -1 for s in steps] or [-1], np.int64)
    # every process must hold the step: the newest step present everywhere
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        gathered = np.asarray(multihost_utils.process_allgather(have))
        common = set(gathered[0].tolist())
        for row in gathered[1:]:
            common &= set(row.tolist())
        have = np.array(sorted(common, reverse=True) or [-1], np.int64)
    chosen = int(have[0]) if have.size and have[0] >= 0 else None
    for s in steps:
        if chosen is not None and s <= chosen:
            break
        log(f"warning: checkpoint {s} in {os.path.join(workdir, 'checkpoints')} is incomplete (its input-stream "
            f"position is missing: the run was stopped while saving it); "
            + (f"resuming from step {chosen}" if chosen is not None else "starting afresh"))
        manager.delete(s)
    return chosen
