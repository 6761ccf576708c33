"""Exact k-nearest-neighbour search by brute force in JAX.

Keys live on the accelerator(s), split along the mesh's data axis, centred on their mean (no
cancellation from a shared offset) and, if extreme, scaled by a power of two
(:mod:`resmem_jax.memory.scaling`: no overflow or underflow whatever their magnitude). For each
chunk of queries every device scans its own keys block by block (``lax.scan``), scoring each key
by ``w |k|^2 - 2 q.k`` (the squared distance less the query's constant ``|q|^2``, see
:func:`~resmem_jax.memory.scaling.scaled_queries`) with a float32 (HIGHEST precision) matmul and
keeping a running top-k; the per-device top-k lists are then merged. Memory stays bounded by
``query_chunk x block_size`` whatever the number of keys. The expansion loses precision for very
close points, so the search keeps a few spare candidates and the caller re-ranks them by directly
computed ``|q - k|`` (:func:`rerank_exact`): returned distances are exact and never come from the
expansion.
"""
from __future__ import annotations

from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from resmem_jax import mesh as mesh_lib
from resmem_jax.memory import index as index_lib
from resmem_jax.memory import scaling

# Extra candidates kept per query so that rounding in the distance expansion cannot push a true
# neighbour out of the re-ranked top-k.
RERANK_MARGIN = 8
# Compiled searches kept per index family (each k and key layout compiles its own).
MAX_SEARCH_FNS = 32


# Group sizes of the multi-stage selection (see _smallest): groups of 64 keys, then groups of 8
# among the chosen groups' members.
SELECT_GROUPS = (64, 8)


def _smallest(score, count: int, groups=SELECT_GROUPS):
  """``(values, positions)`` of the ``count`` smallest entries of each row of ``score [q, w]``.

  Exact, in stages: the k smallest entries lie in at most k groups of ``groups[0]`` consecutive
  entries, and those groups are among the k groups with the smallest minima. So a cheap min per
  group, a top-k over the group minima and a selection among the chosen groups' members (again by
  groups, ``groups[1:]``) replace one top-k over the whole row: on CPU ``lax.top_k`` runs on one
  core at about 4 ns per entry, more than the matmul that made the scores. Equal entries still go
  to the lower position.
  """
  num_rows, width = score.shape
  if not groups or width % groups[0] or width // groups[0] <= count:
    neg, positions = lax.top_k(-score, count)
    return -neg, positions
  size = groups[0]
  grouped = score.reshape(num_rows, width // size, size)
  _, chosen = lax.top_k(-grouped.min(axis=-1), count)
  chosen = jnp.sort(chosen, axis=1)  # ascending: members stay in position order (ties: lower)
  members = jnp.take_along_axis(grouped, chosen[:, :, None], axis=1).reshape(num_rows, -1)
  positions = (chosen[:, :, None] * size + jnp.arange(size, dtype=chosen.dtype)).reshape(num_rows, -1)
  values, within = _smallest(members, count, groups[1:])
  return values, jnp.take_along_axis(positions, within, axis=1)


def _local_topk(queries, weights, num_keys, keys, key_sqnorms, num_candidates, block_size,
                index_offset, query_tile):
  """Top-k over one device's keys ``[blocks * block_size, d]`` -> (scores, indices) ``[q, c]``.

  Queries go ``query_tile`` at a time (``lax.map``) so that a tile's scores against one key block
  stay in cache; each block's own top list is kept and the lists are merged once at the end."""
  blocks = keys.reshape(-1, block_size, keys.shape[-1])
  norms = key_sqnorms.reshape(-1, block_size)
  starts = index_offset + jnp.arange(blocks.shape[0], dtype=jnp.int32) * block_size
  per_block = min(num_candidates, block_size)

  def tile_topk(tile):
    tile_queries, tile_weights = tile

    def step(_, block):
      block_keys, block_norms, start = block
      dots = jnp.dot(tile_queries, block_keys.T, precision=lax.Precision.HIGHEST)
      score = tile_weights[:, None] * block_norms[None, :] - 2.0 * dots
      ids = start + jnp.arange(block_size, dtype=jnp.int32)
      score = jnp.where(ids[None, :] < num_keys, score, jnp.inf)  # padding is never a neighbour
      values, positions = _smallest(score, per_block)
      return None, (values, positions.astype(jnp.int32) + start)

    _, (values, ids) = lax.scan(step, None, (blocks, norms, starts))
    # [blocks, tile, per_block] -> [tile, blocks * per_block], blocks in ascending id order, so
    # lax.top_k (lower index among equal scores) keeps sending ties to the lower id.
    rows = tile_queries.shape[0]
    values = jnp.moveaxis(values, 0, 1).reshape(rows, -1)
    ids = jnp.moveaxis(ids, 0, 1).reshape(rows, -1)
    if values.shape[1] < num_candidates:  # fewer local keys than candidates: pad the list
      pad = num_candidates - values.shape[1]
      values = jnp.pad(values, ((0, 0), (0, pad)), constant_values=jnp.inf)
      ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    neg, keep = lax.top_k(-values, num_candidates)
    return -neg, jnp.take_along_axis(ids, keep, axis=1)

  if queries.shape[0] == query_tile:  # one tile: no loop to compile
    return tile_topk((queries, weights))
  dim = queries.shape[-1]
  values, ids = lax.map(tile_topk, (queries.reshape(-1, query_tile, dim),
                                    weights.reshape(-1, query_tile)))
  return values.reshape(-1, num_candidates), ids.reshape(-1, num_candidates)


def _make_search_fn(mesh, num_candidates: int, block_size: int, local_size: int,
                    query_tile: int):
  """Jitted candidates search for a mesh, candidate count, key layout and query tile."""
  axis = mesh_lib.DATA_AXIS

  def per_device(queries, weights, num_keys, keys, key_sqnorms):
    offset = lax.axis_index(axis).astype(jnp.int32) * local_size
    return _local_topk(queries, weights, num_keys, keys, key_sqnorms, num_candidates, block_size,
                       offset, query_tile)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(axis), P(axis)),
                          out_specs=(P(None, axis), P(None, axis)), check_vma=False)

  @jax.jit
  def search(queries, weights, num_keys, keys, key_sqnorms):
    score, index = sharded(queries, weights, num_keys, keys, key_sqnorms)
    # Merge the per-device top lists (the concatenation along axis 1) into one; lax.top_k keeps
    # the lower id among equal scores, as each device does, so exact ties go to the lower id.
    _, keep = lax.top_k(-score, num_candidates)
    return jnp.take_along_axis(index, keep, axis=1)

  return search


class ShardedKeys:
  """Keys on a mesh: centred, scaled by a power of two (see scaling.py), padded to
  ``local_size`` rows per device and split along the data axis, with their squared norms.

  Placed with ``jax.make_array_from_callback``, so on several hosts each process puts only its
  own devices' rows (every process holds the same host array)."""

  def __init__(self, center, exponent, keys, sqnorms):
    self.center, self.exponent, self.keys, self.sqnorms = center, exponent, keys, sqnorms

  @classmethod
  def place(cls, keys: np.ndarray, mesh, local_size: int) -> "ShardedKeys":
    size, dim = keys.shape
    center = scaling.center(keys)
    padded = np.zeros((local_size * mesh_lib.num_data_shards(mesh), dim), np.float32)
    live = padded[:size]
    np.subtract(keys, center, out=live)
    exponent = scaling.key_exponent(live)
    np.ldexp(live, np.int32(-exponent), out=live)
    sqnorms = np.einsum("nd,nd->n", padded, padded)
    sharding = NamedSharding(mesh, P(mesh_lib.DATA_AXIS))
    put = lambda host: jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])
    return cls(center, exponent, put(padded), put(sqnorms))

  def search_in_chunks(self, search, queries: np.ndarray, chunk: int, num_candidates: int,
                       size: int, calls_in_flight: int = 1, multiple: int = 1) -> np.ndarray:
    """Candidate ids ``[q, num_candidates]`` from ``search(queries, weights, num_keys, keys,
    sqnorms) -> ids`` called on fixed-size chunks of ``chunk`` queries (one compilation; a chunk
    is rounded up to a ``multiple`` of rows), up to ``calls_in_flight`` at once from a thread pool
    when the keys lie on this process's devices alone (a search whose collectives span hosts
    must be called in the same order on every process, so it runs one call at a time)."""
    mesh = self.keys.sharding.mesh
    replicated = mesh_lib.replicated(mesh)
    # make_array_from_callback: on several hosts each process places its own devices' copies.
    put = lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda i: x[i])
    num_keys = put(np.int32(size))
    chunk = max(1, min(chunk, queries.shape[0]))
    chunk = -(-chunk // multiple) * multiple
    out = np.empty((queries.shape[0], num_candidates), np.int32)

    def run(start):
      rows = min(chunk, queries.shape[0] - start)
      part, weights = self.queries(queries[start:start + chunk], chunk)
      ids = search(put(part), put(weights), num_keys, self.keys, self.sqnorms)
      out[start:start + rows] = mesh_lib.to_host(ids)[:rows]

    starts = range(0, queries.shape[0], chunk)
    process_local = all(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if calls_in_flight > 1 and len(starts) > 1 and process_local:
      with futures.ThreadPoolExecutor(min(calls_in_flight, len(starts))) as pool:
        list(pool.map(run, starts))  # re-raises a failed call's error here
    else:
      for start in starts:
        run(start)
    return out

  def queries(self, queries: np.ndarray, rows: int):
    """``(scaled queries, weights)`` for the score ``w |k|^2 - 2 q.k``, zero-padded to ``rows``."""
    part, weights = scaling.scaled_queries(queries - self.center, self.exponent)
    if part.shape[0] < rows:  # fixed shape: one compilation per (rows, candidates)
      pad = rows - part.shape[0]
      part = np.concatenate([part, np.zeros((pad, part.shape[1]), np.float32)])
      weights = np.concatenate([weights, np.ones(pad, np.float32)])
    return part, weights


# Defaults by the platform of the index's devices. On CPU (measured on 2 cores, BUILD_NOTES.md,
# issue 12, "CPU `exact`, session 5"): tiles of 128 queries against 16k keys keep each tile's scores (8 MB) in cache,
# and a second call in flight overlaps one call's single-core lax.top_k with the other's matmul.
# Accelerators keep the large blocks they were built with and one call at a time.
CPU_DEFAULTS = {"block_size": 16384, "query_chunk": 1024, "query_tile": 128, "calls_in_flight": 2}
ACCELERATOR_DEFAULTS = {"block_size": 8192, "query_chunk": 1024, "query_tile": 1024,
                        "calls_in_flight": 1}


def _balanced_block(per_shard: int, block_size: int) -> int:
  """The block size for ``per_shard`` keys: at most ``block_size`` (rounded up to whole selection
  groups), with as few blocks as that allows and as little padding as those blocks allow."""
  blocks = -(-per_shard // max(1, min(block_size, per_shard)))
  block = -(-per_shard // blocks)
  group = SELECT_GROUPS[0]
  return mesh_lib.pad_to_multiple(block, group) if block > group else block


class ExactIndex(index_lib.SearchIndex):
  """Brute-force index over float32 keys, sharded over the local devices.

  Options (unset ones take :data:`CPU_DEFAULTS` or :data:`ACCELERATOR_DEFAULTS`, by the devices'
  platform; only the options given are saved, so a memory built on CPU and loaded on a GPU gets
  the GPU's defaults):
    block_size: keys scored per step on each device, at most (blocks are balanced so that the
      keys are padded little, and rounded up to whole selection groups).
    query_chunk: queries per jitted call.
    query_tile: queries scored together against one key block within a call (memory:
      query_tile x block_size floats); a chunk is rounded up to whole tiles.
    calls_in_flight: jitted calls running at once (threads).
    devices: devices to shard keys over (default: all local devices; not saved).
  """

  OPTION_NAMES = ("block_size", "query_chunk", "query_tile", "calls_in_flight", "devices")
  _SAVED = ("block_size", "query_chunk", "query_tile", "calls_in_flight")

  def __init__(self, keys: np.ndarray, devices=None, search_fns: dict | None = None, **options):
    self.mesh = mesh_lib.data_mesh(list(devices) if devices is not None else jax.local_devices())
    self.num_shards = mesh_lib.num_data_shards(self.mesh)
    self.options = {name: int(options[name]) for name in self._SAVED if name in options}
    platform = self.mesh.devices.flat[0].platform
    settings = {**(CPU_DEFAULTS if platform == "cpu" else ACCELERATOR_DEFAULTS), **self.options}
    self.query_chunk = settings["query_chunk"]
    self.query_tile = settings["query_tile"]
    self.calls_in_flight = settings["calls_in_flight"]
    # Jitted searches by (candidates, block size, local size, tile); an extended index on the
    # same mesh inherits them, so editing the memory does not recompile an unchanged layout.
    self._search_fns = {} if search_fns is None else search_fns
    self.size = keys.shape[0]
    per_shard = -(-self.size // self.num_shards)
    self.block_size = _balanced_block(per_shard, settings["block_size"])
    self.local_size = mesh_lib.pad_to_multiple(per_shard, self.block_size)
    self._layout = ShardedKeys.place(keys, self.mesh, self.local_size)

  @classmethod
  def check_options(cls, options: dict) -> dict:
    index_lib.check_option_names("exact backend options", options, cls.OPTION_NAMES)
    checked = {}
    for name in cls._SAVED:
      if name in options:
        checked[name] = index_lib.integer_option("exact", name, options[name], 1)
    if "devices" in options:
      checked["devices"] = index_lib.devices_option("exact", options["devices"])
    return checked

  @classmethod
  def build(cls, keys: np.ndarray, options: dict) -> ExactIndex:
    return cls(keys, **cls.check_options(options))

  def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
    """Distinct ids ``[q, min(k + RERANK_MARGIN, size)]`` of the nearest keys by the expansion."""
    num_candidates = min(k + RERANK_MARGIN, self.size)
    tile = max(1, min(self.query_tile, self.query_chunk, queries.shape[0]))
    layout = (num_candidates, self.block_size, self.local_size, tile)
    search = index_lib.bounded_put(self._search_fns, layout,
                                   lambda: _make_search_fn(self.mesh, *layout), MAX_SEARCH_FNS)
    return self._layout.search_in_chunks(search, queries, self.query_chunk, num_candidates,
                                         self.size, calls_in_flight=self.calls_in_flight,
                                         multiple=tile)

  def extend(self, keys: np.ndarray) -> ExactIndex:
    return ExactIndex(keys, devices=list(self.mesh.devices.flat), search_fns=self._search_fns,
                      **self.options)

  def save(self, directory: str) -> dict:
    del directory  # rebuilt from the keys on load: nothing to write
    return dict(self.options)

  @classmethod
  def load(cls, directory: str, keys: np.ndarray, info: dict) -> ExactIndex:
    del directory
    index_lib.check_option_names("exact index info", info, cls._SAVED)
    return cls.build(keys, info)


# Squared distances below this may have lost digits to float32 underflow; with overflowed ones
# (inf) they are computed again in float64.
_TINY_SQUARED = 2.0 ** -100


def rerank_exact(queries: np.ndarray, keys: np.ndarray, candidates: np.ndarray, k: int,
                 chunk: int = 512):
  """Sorts candidate ids by directly computed Euclidean distance; keeps the first k.

  ``candidates`` may hold -1 (no candidate; so does any id outside ``[0, len(keys))``); those sort
  last at distance inf. Ties go to the lower index. Distances come from the differences ``q - k``
  (float32), so they carry relative, not absolute, rounding error: a query equal to a key gets
  distance exactly 0. Sums of squares that overflow float32 (entries beyond about 1e19) or could
  have underflowed are recomputed in float64, so every distance of keys and queries within
  :data:`~resmem_jax.memory.scaling.MAX_MAGNITUDE` is finite and accurate. Small chunks keep the
  gathered keys in cache; this gather is the cost of exactness (about 2 ms per 1,000 queries at
  k = 10, d = 128 here).
  """
  num_queries = queries.shape[0]
  out_dist = np.empty((num_queries, k), np.float32)
  out_index = np.empty((num_queries, k), np.int32)
  for start in range(0, num_queries, chunk):
    part = queries[start:start + chunk]
    ids = candidates[start:start + chunk]
    valid = (ids >= 0) & (ids < keys.shape[0])
    diff = keys[np.where(valid, ids, 0)]
    np.subtract(diff, part[:, None, :], out=diff)
    squared = np.einsum("qkd,qkd->qk", diff, diff)
    redo = valid & ~((squared >= _TINY_SQUARED) & (squared < np.inf))
    dist = np.sqrt(squared)
    if redo.any():
      rows, columns = np.nonzero(redo)
      wide = keys[ids[rows, columns]].astype(np.float64) - part[rows].astype(np.float64)
      dist[rows, columns] = np.sqrt(np.einsum("pd,pd->p", wide, wide))
    dist[~valid] = np.inf
    ids = np.where(valid, ids, -1)
    # Sort by (distance, index): the lexsort key order is last-key-primary.
    order = np.lexsort((np.where(valid, ids, np.iinfo(np.int32).max), dist), axis=-1)[:, :k]
    out_dist[start:start + chunk] = np.take_along_axis(dist, order, axis=1)
    out_index[start:start + chunk] = np.take_along_axis(ids, order, axis=1)
  return out_dist, out_index
