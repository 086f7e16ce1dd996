"""Training checkpoints: orbax state, each process's input-stream position, pruning and quarantine.

A checkpoint of step ``S`` is two things, written in this order:

1. each process's input-stream position, ``WORKDIR/data_state/S/process_I/`` (a folder written beside
   and renamed into place, so it exists whole or not at all);
2. the orbax checkpoint ``WORKDIR/checkpoints/S`` (the train state, replicated, and the run's metadata,
   :func:`run_meta`), which orbax itself writes beside and renames.

A restore needs both, so a kill at any moment leaves the previous checkpoint complete
(:data:`advalign_jax.faults.CHECKPOINT_DATA_STATE` and :data:`~advalign_jax.faults.CHECKPOINT_SAVED` are
the crash points between and after them). On resume (:meth:`Checkpoints.restore`): the newest step whose
position every process holds is chosen and newer incomplete ones are removed with a one-line warning; its
metadata must agree with the current config (the resume rule of :mod:`advalign_jax.run_record`); a
checkpoint whose files cannot be read is moved to ``checkpoints_unreadable/`` with one line and the next
older one is tried (in a run of several processes it stops the run in one line instead). Checkpoints
beyond ``keep_checkpoints`` are pruned by orbax, their positions by each process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from advalign_jax import faults, run_record, store
from advalign_jax.errors import AdvalignError, os_error_in, output_error, quiet_library_errors
from advalign_jax.training.config_blocks import adversarial_block

# Config keys added after workdirs were written, each with the value that computes what such a workdir
# computed (a checkpoint whose saved config lacks the key resumes when the current value is this one).
ADDED_KEYS = {
    "objective.differentiation": "auto",  # either order computes the same loss and gradient
    "objective.adversarial": run_record.plain(adversarial_block()),  # only read by the adversarial objectives
    "objective.lambda_rrr": 1.0,  # only read by objective 'rrr'
    "objective.rrr_threshold": 0.0,
}
# Keys that may change between a run and its resumption: they do not change what is computed.
CHANGEABLE = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "workdir",
              "export_to", "num_devices", "distributed")


def run_meta(config, model) -> dict:
    """What a checkpoint must agree with to be resumed by this config: the architecture, and every
    config value except :data:`CHANGEABLE` (:func:`advalign_jax.run_record.resumable_part`)."""
    return {"arch": model.name, "num_classes": model.num_classes,
            "model_options": run_record.plain(config.model.options),
            "optimizer": config.optimizer.name, "objective": config.objective.name,
            "config": run_record.resumable_part(config, CHANGEABLE),
            "process_count": jax.process_count()}


def check_meta(saved: dict, current: dict, path: str) -> None:
    """Refuses to resume a checkpoint written by another architecture, config or process count."""
    for key in ("arch", "num_classes", "model_options", "optimizer", "objective"):
        if saved.get(key) != current.get(key):
            raise AdvalignError(f"{path} holds a checkpoint with {key} {saved.get(key)!r}, but this config has "
                                f"{current.get(key)!r}; use another --config.workdir to start afresh")
    run_record.check_resumable(saved.get("config", {}), current["config"], lambda what: (
        f"{path} holds a run of another configuration ({what}); only {', '.join(CHANGEABLE)} may change on "
        "resume; use another --config.workdir to start afresh"), limit=4, added=ADDED_KEYS)
    saved_count = saved.get("process_count", 1)
    if saved_count != current.get("process_count", 1):
        raise AdvalignError(f"{path} was written by {saved_count} process(es) and this run has "
                            f"{current.get('process_count', 1)}; each process's input-stream position is its own, "
                            f"so resume with {saved_count} process(es) or use another --config.workdir")


def _data_state_dir(workdir: str, step: int, process: Optional[int] = None) -> str:
    p = jax.process_index() if process is None else process
    return os.path.join(os.path.abspath(workdir), "data_state", str(step), f"process_{p}")


def _data_state_prefix(workdir: str, step: int) -> Optional[str]:
    """This process's saved input-stream position of checkpoint ``step`` (None if it was never
    completed)."""
    folder = _data_state_dir(workdir, step)
    return os.path.join(folder, "state") if os.path.isdir(folder) else None


class Checkpoints:
    """The checkpoints of one training workdir (orbax's manager and the input-stream positions)."""

    def __init__(self, workdir: str, keep: int, log):
        self.workdir = workdir
        self.folder = os.path.join(workdir, "checkpoints")
        self.log = log
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True, enable_async_checkpointing=False)
        try:
            self.manager = ocp.CheckpointManager(os.path.abspath(self.folder), options=options,
                                                 item_names=("state", "meta"))
        except Exception as err:  # pylint: disable=broad-except
            os_err = os_error_in(err)
            if os_err is None:
                raise
            raise output_error(self.folder, os_err) from None

    def restore(self, meta: dict, abstract_state, train_input):
        """``(state, step)`` of the newest complete, readable checkpoint that agrees with ``meta``
        (``train_input`` is moved to its position); ``(None, None)`` when there is none."""
        latest = _restorable_step(self.manager, self.workdir, self.log)
        if latest is None:
            return None, None
        return _restore_newest_readable(self.manager, self.workdir, latest, meta, abstract_state, train_input,
                                        self.log)

    def save(self, step: int, state, meta: dict, train_input) -> None:
        _save(self.manager, self.workdir, step, state, meta, train_input)


def _save(manager, workdir, step, state, meta, train_input) -> None:
    """Checkpoint ``step``: the input-stream position first (a folder renamed into place), then the
    orbax checkpoint (written beside and renamed by orbax). A restore needs both, so a kill at any
    moment leaves the previous checkpoint complete."""
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
        raise output_error(folder, err) from None
    faults.crash_point(faults.CHECKPOINT_DATA_STATE)
    try:
        with quiet_library_errors(on_failure=manager.close):  # one line says what failed
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)
            manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
        os_err = os_error_in(err)
        if os_err is None:
            raise
        raise output_error(os.path.join(workdir, "checkpoints"), os_err) from None
    faults.crash_point(faults.CHECKPOINT_SAVED)
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
    folder = os.path.join(workdir, "checkpoints")
    candidates = [s for s in sorted(manager.all_steps(), reverse=True)
                  if s <= first and _data_state_prefix(workdir, s) is not None]
    for i, step in enumerate(candidates):
        try:
            saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            check_meta(saved, meta, folder)  # a ConfigError: never skipped
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
