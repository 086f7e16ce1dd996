"""Devices, meshes and placement: one code path for one CPU, one GPU, or a multi-host TPU pod.

- :func:`initialize_distributed` starts multi-host JAX (``jax.distributed.initialize()``) when asked;
  it must run before any other JAX call in the process; :func:`job_mesh` is every job's preamble (the
  start-up, then the mesh over ``config.num_devices``).
- :func:`make_mesh` builds a 2-D mesh ``('data', 'model')`` over all devices (the model axis is 1
  unless asked for), so data parallelism shards the batch over every device of every host.
- :func:`shard_batch` turns each process's host batch (NumPy) into global ``jax.Array``s split along
  the data axis; :func:`replicate` places parameters and optimizer state on every device.

Data-parallel code written against these gives the same numbers on 1 device as on 8 (up to the
order of floating-point reductions), which the tests check.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from advalign_jax.errors import AdvalignError

DATA_AXIS = "data"
MODEL_AXIS = "model"

_DISTRIBUTED = False


def initialize_distributed(enabled: bool, coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None, process_id: Optional[int] = None) -> None:
    """Starts multi-controller JAX (``jax.distributed.initialize``) once, when ``enabled``.

    It must run before any other JAX call of the process. The layout comes from the arguments, else
    from the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0's coordinator), with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` where no cluster is detected automatically; with none
    of them set, JAX detects the cluster itself (Cloud TPU, SLURM, Open MPI). On CPU the cross-process
    collectives are gloo's. ``ADVALIGN_JAX_HEARTBEAT_TIMEOUT_S`` (default 60) bounds how long the
    survivors wait for a process that died before they stop.
    """
    global _DISTRIBUTED
    if not enabled or _DISTRIBUTED:
        return
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    try:
        if num_processes is None and env.get("JAX_NUM_PROCESSES"):
            num_processes = int(env["JAX_NUM_PROCESSES"])
        if process_id is None and env.get("JAX_PROCESS_ID"):
            process_id = int(env["JAX_PROCESS_ID"])
        heartbeat = int(env.get("ADVALIGN_JAX_HEARTBEAT_TIMEOUT_S", "60"))
    except ValueError as err:
        raise AdvalignError(f"the process layout in the environment is not a number ({err}); set "
                            "JAX_NUM_PROCESSES and JAX_PROCESS_ID to integers") from None
    if (num_processes is None) != (process_id is None) or (num_processes is not None and not coordinator_address):
        raise AdvalignError("a multi-process run needs JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                            "JAX_PROCESS_ID together (or none of them where the cluster is detected "
                            "automatically: Cloud TPU, SLURM)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise AdvalignError(f"JAX_PROCESS_ID={process_id} is not in [0, JAX_NUM_PROCESSES={num_processes})")
    if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                    process_id=process_id).items() if v is not None}
    try:
        jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=heartbeat)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdvalignError(f"could not join the multi-process run ({first}); check JAX_COORDINATOR_ADDRESS "
                            "and that every process was started") from None
    _DISTRIBUTED = True


def is_distributed() -> bool:
    return _DISTRIBUTED


def make_mesh(model_axis_size: int = 1, devices: Optional[list] = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all devices of all processes).

    ``model_axis_size`` devices form each model-parallel group; it must divide the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model_axis_size < 1 or len(devices) % model_axis_size:
        raise ValueError(f"model_axis_size={model_axis_size} must divide the {len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model_axis_size, model_axis_size)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def job_mesh(config) -> Mesh:
    """What every job does first: the multi-process start-up when ``config.distributed`` (it must come
    before any other JAX call), then the mesh over the first ``config.num_devices`` devices (0: all)."""
    initialize_distributed(bool(config.distributed))
    return make_mesh(devices=jax.devices()[:config.num_devices] if config.num_devices else None)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the data axis, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device."""
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def check_batch_size(global_batch: int, mesh: Mesh, key: str = "batch_size") -> None:
    """Raises ValueError unless the global batch splits evenly over the data axis and the processes."""
    n = data_parallel_size(mesh)
    if global_batch % n or global_batch % jax.process_count():
        raise ValueError(f"{key}={global_batch} must be a multiple of the {n} data-parallel devices "
                         f"and of the {jax.process_count()} processes")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host-local arrays (this process's slice of the global batch) -> global sharded ``jax.Array``s.

    Every leaf's leading axis is the per-process batch; the global batch is their concatenation over
    processes in process order.
    """
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` (identical on all processes) on all devices of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def to_host(tree: Any) -> Any:
    """Global arrays -> NumPy on every process (gathers across hosts when needed)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def all_processes(flag: bool) -> bool:
    """True when ``flag`` is true on every process (the same answer everywhere, so every process
    takes the same branch and none waits on a collective the others skip)."""
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray([bool(flag)]))
    return bool(np.all(flags))


def from_process_0(value: np.ndarray) -> np.ndarray:
    """Process 0's ``value`` on every process (a NumPy array of the same shape and dtype everywhere)."""
    if jax.process_count() == 1:
        return np.asarray(value)
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def replicated_to_host(tree: Any) -> Any:
    """Replicated global arrays (parameters, metrics) -> NumPy on every process, without a collective:
    each process reads the copy on one of its own devices."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def sync(name: str) -> None:
    """Waits until every process reaches this point (a no-op with one process)."""
    if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)
