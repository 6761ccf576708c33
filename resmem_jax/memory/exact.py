"""Exact k-nearest-neighbour search by brute force in JAX.

Keys live on the accelerator(s), split along the mesh's data axis. For each chunk of queries every
device scans its own keys block by block (``lax.scan``), computing squared distances as
``|q|^2 - 2 q.k + |k|^2`` with a float32 (HIGHEST precision) matmul and keeping a running top-k;
the per-device top-k lists are then merged. Memory stays bounded by ``query_chunk x block_size``
whatever the number of keys. The expansion loses precision for very close points, so the search
keeps a few spare candidates and the caller re-ranks them by directly computed ``|q - k|``
(:func:`rerank_exact`): returned distances are exact and never come from the expansion.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from resmem_jax import mesh as mesh_lib
from resmem_jax.memory import index as index_lib

# Extra candidates kept per query so that rounding in the distance expansion cannot push a true
# neighbour out of the re-ranked top-k.
RERANK_MARGIN = 8
# Compiled searches kept per index family (each k and key layout compiles its own).
MAX_SEARCH_FNS = 32


def _local_topk(queries, keys, key_sqnorms, num_candidates, block_size, index_offset):
  """Running top-k over one device's keys [blocks*block_size, d] -> (sq distances, indices)."""
  num_queries = queries.shape[0]
  blocks = keys.reshape(-1, block_size, keys.shape[-1])
  norms = key_sqnorms.reshape(-1, block_size)
  starts = index_offset + jnp.arange(blocks.shape[0], dtype=jnp.int32) * block_size
  query_sq = jnp.sum(queries * queries, axis=-1, keepdims=True)
  per_block = min(num_candidates, block_size)

  def step(carry, block):
    best_dist, best_index = carry
    block_keys, block_norms, start = block
    dots = jnp.dot(queries, block_keys.T, precision=lax.Precision.HIGHEST)
    dist = jnp.maximum(query_sq - 2.0 * dots + block_norms[None, :], 0.0)
    neg_dist, pos = lax.top_k(-dist, per_block)
    merged_dist = jnp.concatenate([best_dist, -neg_dist], axis=1)
    merged_index = jnp.concatenate([best_index, pos.astype(jnp.int32) + start], axis=1)
    neg_best, keep = lax.top_k(-merged_dist, num_candidates)
    return (-neg_best, jnp.take_along_axis(merged_index, keep, axis=1)), None

  init = (jnp.full((num_queries, num_candidates), jnp.inf, jnp.float32),
          jnp.full((num_queries, num_candidates), -1, jnp.int32))
  (best_dist, best_index), _ = lax.scan(step, init, (blocks, norms, starts))
  return best_dist, best_index


def _make_search_fn(mesh, num_candidates: int, block_size: int, local_size: int):
  """Jitted candidates search for a mesh, candidate count and key layout."""
  axis = mesh_lib.DATA_AXIS

  def per_device(queries, keys, key_sqnorms):
    offset = lax.axis_index(axis).astype(jnp.int32) * local_size
    return _local_topk(queries, keys, key_sqnorms, num_candidates, block_size, offset)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis), P(axis)),
                          out_specs=(P(None, axis), P(None, axis)), check_vma=False)

  @jax.jit
  def search(queries, keys, key_sqnorms):
    dist, index = sharded(queries, keys, key_sqnorms)
    # Merge the per-device top lists (the concatenation along axis 1) into one.
    neg, keep = lax.top_k(-dist, num_candidates)
    return -neg, jnp.take_along_axis(index, keep, axis=1)

  return search


class ExactIndex(index_lib.SearchIndex):
  """Brute-force index over float32 keys, sharded over the local devices.

  Options:
    block_size: keys scanned per step on each device (default 8192).
    query_chunk: queries per jitted call (bounded memory: query_chunk x block_size floats;
      default 1024).
    devices: devices to shard keys over (default: all local devices; not saved).
  """

  OPTION_NAMES = ("block_size", "query_chunk", "devices")

  def __init__(self, keys: np.ndarray, block_size: int = 8192, query_chunk: int = 1024,
               devices=None, search_fns: dict | None = None):
    self.mesh = mesh_lib.data_mesh(list(devices) if devices is not None else jax.local_devices())
    self.num_shards = mesh_lib.num_data_shards(self.mesh)
    self.options = {"block_size": int(block_size), "query_chunk": int(query_chunk)}
    self.query_chunk = int(query_chunk)
    # Jitted searches by (candidates, block size, local size); an extended index on the same
    # mesh inherits them, so editing the memory does not recompile an unchanged layout.
    self._search_fns = {} if search_fns is None else search_fns
    self.size, dim = keys.shape
    per_shard = -(-self.size // self.num_shards)
    self.block_size = max(1, min(int(block_size), per_shard))
    self.local_size = mesh_lib.pad_to_multiple(per_shard, self.block_size)
    padded = np.zeros((self.local_size * self.num_shards, dim), np.float32)
    padded[:self.size] = keys
    sqnorms = np.full((padded.shape[0],), np.inf, np.float32)  # padding is never a neighbour
    sqnorms[:self.size] = np.einsum("nd,nd->n", keys, keys)
    sharding = NamedSharding(self.mesh, P(mesh_lib.DATA_AXIS))
    self._device_keys = jax.device_put(padded, sharding)
    self._device_sqnorms = jax.device_put(sqnorms, sharding)

  @classmethod
  def check_options(cls, options: dict) -> dict:
    index_lib.check_option_names("exact backend options", options, cls.OPTION_NAMES)
    checked = {}
    for name in ("block_size", "query_chunk"):
      if name in options:
        checked[name] = index_lib.integer_option("exact", name, options[name], 1)
    if "devices" in options:
      devices = options["devices"]
      if devices is not None and (isinstance(devices, str) or not hasattr(devices, "__len__")
                                  or len(devices) == 0):
        raise ValueError(f"exact option devices must be a non-empty list of devices, got {devices!r}")
      checked["devices"] = devices
    return checked

  @classmethod
  def build(cls, keys: np.ndarray, options: dict) -> ExactIndex:
    return cls(keys, **cls.check_options(options))

  def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids ``[q, min(k + RERANK_MARGIN, size)]`` of the nearest keys under the expansion formula."""
    num_candidates = min(k + RERANK_MARGIN, self.size)
    layout = (num_candidates, self.block_size, self.local_size)
    if layout not in self._search_fns:
      if len(self._search_fns) >= MAX_SEARCH_FNS:  # many edits: drop the oldest layout
        del self._search_fns[next(iter(self._search_fns))]
      self._search_fns[layout] = _make_search_fn(self.mesh, *layout)
    search = self._search_fns[layout]
    replicated = mesh_lib.replicated(self.mesh)
    out = np.empty((queries.shape[0], num_candidates), np.int32)
    chunk = min(self.query_chunk, max(1, queries.shape[0]))
    for start in range(0, queries.shape[0], chunk):
      part = queries[start:start + chunk]
      rows = part.shape[0]
      if rows < chunk:  # fixed shape: one compilation per (chunk, candidates)
        part = np.concatenate([part, np.zeros((chunk - rows, part.shape[1]), np.float32)])
      _, index = search(jax.device_put(part, replicated), self._device_keys, self._device_sqnorms)
      out[start:start + rows] = np.asarray(index)[:rows]
    return out

  def extend(self, keys: np.ndarray) -> ExactIndex:
    return ExactIndex(keys, self.options["block_size"], self.query_chunk,
                      devices=list(self.mesh.devices.flat), search_fns=self._search_fns)

  def save(self, directory: str) -> dict:
    del directory  # rebuilt from the keys on load: nothing to write
    return dict(self.options)

  @classmethod
  def load(cls, directory: str, keys: np.ndarray, info: dict) -> ExactIndex:
    del directory
    return cls.build(keys, info)


def rerank_exact(queries: np.ndarray, keys: np.ndarray, candidates: np.ndarray, k: int,
                 chunk: int = 512):
  """Sorts candidate ids by directly computed Euclidean distance; keeps the first k.

  ``candidates`` may hold -1 (no candidate); those sort last. Ties go to the lower index.
  Distances come from the differences ``q - k`` (float32), so they carry relative, not
  absolute, rounding error: a query equal to a key gets distance exactly 0. Small chunks keep
  the gathered keys in cache; this gather is the cost of exactness (about 2 ms per 1,000
  queries at k = 10, d = 128 here).
  """
  num_queries = queries.shape[0]
  out_dist = np.empty((num_queries, k), np.float32)
  out_index = np.empty((num_queries, k), np.int32)
  for start in range(0, num_queries, chunk):
    ids = candidates[start:start + chunk]
    valid = ids >= 0
    diff = keys[np.where(valid, ids, 0)]
    np.subtract(diff, queries[start:start + chunk, None, :], out=diff)
    dist = np.sqrt(np.einsum("qkd,qkd->qk", diff, diff))
    dist[~valid] = np.inf
    # Sort by (distance, index): the lexsort key order is last-key-primary.
    order = np.lexsort((np.where(valid, ids, np.iinfo(np.int32).max), dist), axis=-1)[:, :k]
    out_dist[start:start + chunk] = np.take_along_axis(dist, order, axis=1)
    out_index[start:start + chunk] = np.take_along_axis(ids, order, axis=1)
  return out_dist, out_index
