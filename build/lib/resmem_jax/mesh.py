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


def initialize_distributed(enabled: bool | None = None) -> None:
  """Calls ``jax.distributed.initialize()`` for multi-host runs, unless JAX already is.

  ``enabled=None`` decides from the environment: JAX's own coordinator variables, a TPU pod
  slice (TPU_WORKER_HOSTNAMES with several hosts) or a SLURM job with several tasks.
  """
  if jax.distributed.is_initialized():
    return
  if enabled is None:
    env = os.environ
    enabled = bool(
        env.get("JAX_COORDINATOR_ADDRESS")
        or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1)
  if enabled:
    jax.distributed.initialize()


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
  """Global (possibly multi-host sharded) arrays -> full numpy arrays on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree_util.tree_map(np.asarray, tree)


def pad_to_multiple(n: int, multiple: int) -> int:
  """Smallest m >= n that is a multiple of ``multiple`` (m >= multiple when n == 0)."""
  return max(multiple, -(-n // multiple) * multiple)
