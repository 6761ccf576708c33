"""Device placement in one place: a 1-D data-parallel mesh and helpers to put arrays on it.

Everything else in the package takes and returns arrays and never asks how many devices exist.
The mesh has a single axis, ``"data"``: batches are split along it, parameters are replicated.
On several hosts each process feeds its own slice of the global batch
(``jax.make_array_from_process_local_data``), so the same code runs on a laptop, 8 GPUs or a pod.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def launch_arguments(train, env=None) -> dict | None:
  """The arguments of ``jax.distributed.initialize`` for this launch; None for one process.

  Routes, first match wins (``train`` is the TrainSettings):
    1. the config fields ``train.coordinator_address``, ``train.num_processes``,
       ``train.process_id`` (all three);
    2. JAX's environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
       ``JAX_PROCESS_ID`` (the address alone only where a cluster supplies the other two);
    3. a cluster JAX detects by itself: a TPU VM slice of several workers, a SLURM job of several
       tasks (no arguments).
  ``train.distributed``: None decides from the above, False never initializes, True requires a
  route.
  """
  from resmem_jax.settings import SettingsError  # pylint: disable=g-import-not-at-top
  env = os.environ if env is None else env
  if train.distributed is False:
    return None
  timeout = {"heartbeat_timeout_seconds": int(train.heartbeat_timeout_seconds)}
  fields = (train.coordinator_address, train.num_processes, train.process_id)
  if any(f is not None for f in fields):
    if any(f is None for f in fields):
      raise SettingsError("a multi-host launch from the config needs train.coordinator_address, "
                          "train.num_processes and train.process_id all set")
    return dict(coordinator_address=train.coordinator_address,
                num_processes=train.num_processes, process_id=train.process_id, **timeout)
  cluster = (len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
             or int(env.get("SLURM_NTASKS", "1") or 1) > 1)
  address = env.get("JAX_COORDINATOR_ADDRESS")
  if address:
    count, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
    if count and index:
      try:
        return dict(coordinator_address=address, num_processes=int(count),
                    process_id=int(index), **timeout)
      except ValueError:
        raise SettingsError(f"JAX_NUM_PROCESSES={count!r} and JAX_PROCESS_ID={index!r} must be "
                            "integers") from None
    if cluster:
      return dict(coordinator_address=address, **timeout)
    raise SettingsError("JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                        "are not (and no TPU or SLURM cluster supplies them): set both on every "
                        "process, e.g. JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 on the first")
  if cluster:
    return dict(timeout)
  if train.distributed:
    raise SettingsError("train.distributed=True but nothing describes the other processes: set "
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or the "
                        "train.coordinator_address / num_processes / process_id fields), or run "
                        "under SLURM or on a TPU VM slice")
  return None


def initialize_distributed(train) -> None:
  """Joins this process to a multi-host run (see :func:`launch_arguments`); later calls return.

  The one entry point to JAX's distributed runtime. It must run before anything asks JAX about
  devices, so the command-line tools call it once per process, before their main
  (``resmem_jax/cli/flags.py``); training, inference and the memory never call it, they take the
  processes as they find them. A program of its own on several hosts calls it first.
  """
  if jax.distributed.is_initialized():
    return
  arguments = launch_arguments(train)
  if arguments is not None:
    jax.distributed.initialize(**arguments)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes), axis ``"data"``.

  The axis type is set to Auto explicitly: ``jax.make_mesh`` defaults to Explicit axes since
  JAX 0.8, which would change how jit propagates shardings through our step functions.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split across the data axis, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def num_data_shards(mesh: Mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def local_batch_multiple(mesh: Mesh) -> int:
  """A host-local batch must be a multiple of this (the number of local devices in the mesh)."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return max(1, len(local))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` whole on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch (leading axis = this process's examples) -> global sharded arrays.

  On one host this is a plain ``device_put`` with a batch sharding; on several hosts the global
  batch is the concatenation of every process's local batch, in process order.
  """
  sharding = batch_sharded(mesh)
  multiple = local_batch_multiple(mesh)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % multiple:
      raise ValueError(
          f"batch leading dimension {x.shape[:1]} must be a multiple of the {multiple} local "
          "devices; pad the batch (see resmem_jax.data) or change the batch size")
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map(put, tree)


def to_host(tree: Any) -> Any:
  """Global (possibly multi-host sharded) arrays -> full numpy arrays on every process.

  Only arrays spread over other processes' devices are gathered: an array on this process's own
  devices (a host-local memory's search) is already whole here."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(np.asarray, tree)
  from jax.experimental import multihost_utils

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree_util.tree_map(fetch, tree)


def pad_to_multiple(n: int, multiple: int) -> int:
  """Smallest m >= n that is a multiple of ``multiple`` (m >= multiple when n == 0)."""
  return max(multiple, -(-n // multiple) * multiple)
