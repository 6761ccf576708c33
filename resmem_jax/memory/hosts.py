"""A memory split across hosts: each process indexes only its own rows; queries are collective.

For memories no single host can hold (a per-token memory of C4), every process builds an ordinary
:class:`~resmem_jax.memory.Memory` (any backend) from the training rows it embedded itself, and
:class:`HostShardedMemory` joins them into one memory of ``sum(sizes)`` rows. Global row ids run
through the processes in process order (process 0's rows first), as the rows of a multi-host
inference pass do.

Every method that reads rows is a collective: all processes call it with the same queries (or ids)
and all get the same answer. A search asks each process's own memory for its k nearest rows,
gathers the ``[q, k]`` lists across processes (``multihost_utils.process_allgather``) and keeps
the k nearest overall, ordered by (distance, id) as a single memory orders them; each memory's
distances are computed directly from the query and key, so the merged answer equals the
single-host one. Residual rows of global ids are filled by their owner and gathered the same way.
The cost per query batch is one local search and two gathers of ``[processes, q, k(, C)]``.

The interface is :class:`~resmem_jax.memory.protocol.ResidualMemory`, what
:class:`~resmem_jax.memory.Memory` offers its readers (``search``, ``residual_rows``,
``gather_residuals``, ``labels_of``, ``size``, ``dim``, ``num_outputs``, ``with_store``, ...), so
:func:`resmem_jax.resmem.predict` and the job's selection and evaluation work on it unchanged.
Each process saves its own part (:meth:`save` writes ``PATH/process_I``) and :meth:`load` reopens
them on the same process count.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING
import zlib

import jax
import numpy as np

from resmem_jax.memory import checks

if TYPE_CHECKING:  # for the annotation only: the package is imported lazily, as load and build do
  from resmem_jax.memory import Memory


def _gather(array: np.ndarray) -> np.ndarray:
  """``[processes, ...]``: this array from every process (the same shape on all)."""
  if jax.process_count() == 1:
    return np.asarray(array)[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(array), tiled=False))


def all_processes_agree(flag: bool) -> bool:
  """Collective: True when ``flag`` is True on every process."""
  return bool(_gather(np.array([bool(flag)], np.int32)).min())


class HostShardedMemory:
  """One memory whose rows are split across processes (see the module docstring)."""

  def __init__(self, local: Memory):
    """``local``: this process's own rows, a whole memory (its labels and save are used too)."""
    self.local = local
    shape = np.array([local.size, local.dim, local.num_outputs], np.int64)
    shapes = _gather(shape)
    if np.any(shapes[:, 1:] != shapes[0, 1:]):
      raise ValueError(f"host memories disagree on (dim, outputs): {shapes[:, 1:].tolist()} by "
                       "process; every process must embed with the same model and label set")
    self.sizes = shapes[:, 0]
    self.offset = int(self.sizes[:jax.process_index()].sum())  # rows of the processes before
    if self.sizes.sum() >= np.iinfo(np.int32).max:
      raise ValueError(f"{int(self.sizes.sum()):,} rows do not fit the int32 row ids")

  @property
  def size(self) -> int:
    return int(self.sizes.sum())

  @property
  def dim(self) -> int:
    return self.local.dim

  @property
  def num_outputs(self) -> int:
    return self.local.num_outputs

  @property
  def residual_format(self) -> str:
    return self.local.residual_format

  @property
  def backend(self) -> str:
    return self.local.backend

  @property
  def backend_options(self) -> dict:
    return self.local.backend_options

  def with_store(self, store, metadata=None) -> HostShardedMemory:
    """Collective: the same keys with this process's rows of another residual store."""
    return HostShardedMemory(self.local.with_store(store, metadata))

  def tune_search(self, queries, k: int, target_recall: float = 0.99, **grids) -> dict:
    """Tunes this host's index on ``queries`` (recall@k of its own part against exact search
    over its own rows); each host keeps its own setting."""
    return self.local.tune_search(queries, min(k, self.local.size), target_recall, **grids)

  def _same_everywhere(self, what: str, array: np.ndarray) -> None:
    """Refuses a collective call whose input differs between processes (it would hang or mix)."""
    digest = np.array([array.shape[0], zlib.crc32(np.ascontiguousarray(array).tobytes())],
                      np.int64)
    digests = _gather(digest)
    if np.any(digests != digests[0]):
      raise ValueError(f"{what} differ between processes (rows {digests[:, 0].tolist()}); "
                       f"every process must pass the same {what} to a host-sharded memory")

  def search(self, queries, k: int):
    """``(distances [q, k], global ids [q, k])`` of the k nearest rows of all hosts."""
    # Compared first, so a bad input fails on every process alike instead of stalling the others.
    self._same_everywhere("queries", np.asarray(queries))
    queries = checks.queries(queries, self.dim)
    k = checks.neighbour_count(k, self.size)
    local_k = min(k, self.local.size)
    distances = np.full((queries.shape[0], k), np.inf, np.float32)
    ids = np.full((queries.shape[0], k), -1, np.int32)
    if local_k:
      distances[:, :local_k], local_ids = self.local.search(queries, local_k)
      ids[:, :local_k] = local_ids + self.offset
    all_distances = np.concatenate(list(_gather(distances)), axis=1)  # [q, processes * k]
    all_ids = np.concatenate(list(_gather(ids)), axis=1)
    order = np.lexsort((np.where(all_ids >= 0, all_ids, np.iinfo(np.int32).max), all_distances),
                       axis=-1)[:, :k]
    return (np.take_along_axis(all_distances, order, axis=1),
            np.take_along_axis(all_ids, order, axis=1))

  def _owned(self, ids) -> tuple[np.ndarray, np.ndarray]:
    self._same_everywhere("ids", np.asarray(ids).reshape(-1, 1))
    ids = checks.row_ids(ids, self.size)
    mine = (ids >= self.offset) & (ids < self.offset + self.local.size)
    return mine, np.where(mine, ids - self.offset, 0)

  def _from_owners(self, mine: np.ndarray, local_rows: np.ndarray) -> np.ndarray:
    """Each entry from its owner: non-owners send zeros, so the sum is the owner's value."""
    extra = (1,) * (local_rows.ndim - mine.ndim)
    return _gather(np.where(mine.reshape(mine.shape + extra), local_rows, 0)).sum(axis=0)

  def residual_rows(self, ids):
    """The residual rows of global ``ids``, as :meth:`Memory.residual_rows` returns them."""
    mine, local = self._owned(ids)
    values, columns = self.local.residual_rows(local)
    values = self._from_owners(mine, values).astype(np.float32)
    if columns is not None:
      columns = self._from_owners(mine, columns).astype(np.int32)
    return values, columns

  def gather_residuals(self, ids) -> np.ndarray:
    """Dense float32 residuals ``[..., C]`` of global ``ids``."""
    mine, local = self._owned(ids)
    return self._from_owners(mine, self.local.gather_residuals(local)).astype(np.float32)

  def labels_of(self, ids) -> np.ndarray:
    """What global rows ``ids`` memorize (int32), for memories built with labels."""
    if self.local.labels is None:
      raise ValueError("this memory was built without labels")
    mine, local = self._owned(ids)
    return self._from_owners(mine, self.local.labels[local]).astype(np.int32)

  def save(self, path) -> None:
    """Each process writes its own part to ``path/process_I`` (``path`` on a shared file system
    or per-host disks; :meth:`load` needs each process to see its own part)."""
    self.local.save(os.path.join(os.fspath(path), f"process_{jax.process_index()}"))

  @classmethod
  def load(cls, path) -> HostShardedMemory:
    """Collective: every process opens its own ``path/process_I``. If any process cannot, every
    process raises (none is left waiting for the others)."""
    from resmem_jax.memory import load_memory  # pylint: disable=g-import-not-at-top
    part = os.path.join(os.fspath(path), f"process_{jax.process_index()}")
    local = error = None
    try:
      if not os.path.isdir(part):
        raise FileNotFoundError(f"no host memory part {part}: was it saved by "
                                f"{jax.process_count()} processes? (load with the process count "
                                "that saved it)")
      local = load_memory(part)
    except (OSError, ValueError) as err:
      error = err
    if not all_processes_agree(error is None):
      if error is not None:
        raise error
      raise ValueError(f"another process could not load its part of the host memory in {path}")
    assert local is not None  # loaded: no error on this process
    return cls(local)

  def __repr__(self):
    return (f"HostShardedMemory(size={self.size}, sizes={self.sizes.tolist()}, dim={self.dim}, "
            f"backend={self.backend!r})")


def build_host_sharded_memory(keys, residuals, backend: str = "exact", **options) -> HostShardedMemory:
  """Collective: each process passes the rows it embedded; arguments as
  :func:`~resmem_jax.memory.build_memory`. The ``approx`` backend keeps each host's keys on that
  host's own devices (``across_hosts=False``)."""
  from resmem_jax.memory import build_memory  # pylint: disable=g-import-not-at-top
  if backend == "approx":
    options.setdefault("across_hosts", False)
  return HostShardedMemory(build_memory(keys, residuals, backend=backend, **options))
