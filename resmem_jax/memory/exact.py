"""Exact k-nearest-neighbour search by brute force in JAX.

Keys live on the accelerator(s), split along the mesh's data axis, centred on their mean and, if
extreme, scaled by a power of two (:mod:`resmem_jax.memory.scaling`: no overflow or underflow
whatever their magnitude). For each chunk of queries every device scans its own keys block by
block (``lax.scan``) with a float32 (HIGHEST precision) matmul and keeps a running top list; the
per-device lists are then merged. Memory stays bounded by ``query_chunk x block_size`` whatever
the number of keys.

The expansion ``|q - k|^2 = |q|^2 - 2 q.k + |k|^2`` cancels: its rounding error grows with
``|q| |k|``, not with the distance, so keys far from the mean (two distant clusters, one outlier)
get scores that cannot tell their near neighbours apart. The search therefore ranks keys by a
guaranteed *lower bound* of the squared distance (the computed score less a proven bound on its
error, :func:`error_coefficient`) and certifies each query's list on the host
(:meth:`ShardedKeys.certified`): when the smallest lower bound left out is above the k-th
smallest upper bound kept, no key left out can be among the k nearest. A query whose list is not
certified is searched again with 8 times more candidates, and beyond :data:`MAX_CANDIDATES` by
directly computed distances over every key (:func:`direct_nearest`). The caller re-ranks the
candidates by directly computed ``|q - k|`` (:func:`rerank_exact`): returned distances never come
from the expansion.
"""
from __future__ import annotations

import os
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from resmem_jax import mesh as mesh_lib
from resmem_jax.memory import index as index_lib
from resmem_jax.memory import rerank_kernel
from resmem_jax.memory import scaling

# Spare candidates of a query's first search: with them the list is usually certified at once.
RERANK_MARGIN = 8
# An uncertified query is searched again with this many times more candidates ...
WIDEN = 8
# ... up to this many; beyond, its distances to every key are computed directly.
MAX_CANDIDATES = 2048
# Compiled searches kept per index family (each k and key layout compiles its own).
MAX_SEARCH_FNS = 32

# float32's unit roundoff, and its smallest normal number: XLA on CPU flushes subnormal results
# to zero, so an operation whose result is subnormal loses less than _NORMAL_MIN absolutely.
_U = 2.0 ** -24
_NORMAL_MIN = 2.0 ** -126


def error_coefficient(dim: int) -> float:
  """``kappa`` with ``|computed - exact| <= kappa (w |k|^2 + 2 |q| |k|) + eta`` for the score
  ``w |k|^2 - 2 q.k`` of one key (see :meth:`ShardedKeys.place` for ``eta``).

  Why: the bound is one matmul of length d + 2 (:func:`lower_bounds`) whose summands are
  ``-2 q_i k_i``, ``w |k|^2 (1 - kappa)`` and ``-2 kappa |q| |k|``. Summed in any order with
  products rounded to within u (CPU and GPU at HIGHEST precision; 3u for TPU's 6-pass bfloat16
  HIGHEST), it errs by at most ``gamma_{d+4} (2 sum |q_i k_i| + w |k|^2 + ...)`` with
  ``gamma_n = n u / (1 - n u)`` and ``sum |q_i k_i| <= |q| |k|``. The stored norm (summed in
  float64) errs by u; rounding the centred key ``k - c`` moves it by at most ``u |k - c|``, which
  changes the squared distance by at most ``2 u |k| (|q| + |k|)`` (scaled units:
  ``u 2|q||k| + 2u w|k|^2``). Summed: at most ``(d + 7) u`` on each term; ``d + 8`` and the
  factor 1.01 cover the second-order terms (``kappa`` times the matmul's own rounding) for d up
  to 2**16. The error bound is itself rounded outward where stored.
  """
  terms = (dim + 8) * _U
  return 1.01 * terms / (1.0 - terms)


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


def lower_bounds(queries, keys):
  """Lower bounds ``[q, n]`` of the squared distances less ``|q|^2`` (scaled units), float32, up
  to each query's ``eta`` (which the host subtracts: it does not change a query's ranking).

  One matmul of augmented rows (:meth:`ShardedKeys.place`, :meth:`ShardedKeys.queries`):
  ``[q', w, |q'| bound] . [-2 k', |k'|^2 (1 - kappa), -2 kappa |k'|]`` is the score
  ``w |k|^2 - 2 q.k`` less its error bound, with no elementwise pass after the matmul.
  """
  return jnp.dot(queries, keys.T, precision=lax.Precision.HIGHEST)


def _local_topk(queries, num_keys, keys, num_candidates, block_size, index_offset, query_tile):
  """The ``num_candidates`` smallest lower bounds over one device's keys
  ``[blocks * block_size, d]`` -> (bounds, indices) ``[q, c]``.

  Queries go ``query_tile`` at a time (``lax.map``) so that a tile's scores against one key block
  stay in cache; each block's own top list is kept and the lists are merged once at the end."""
  blocks = keys.reshape(-1, block_size, keys.shape[-1])
  starts = index_offset + jnp.arange(blocks.shape[0], dtype=jnp.int32) * block_size
  per_block = min(num_candidates, block_size)

  def tile_topk(tile_queries):

    def step(_, block):
      block_keys, start = block
      score = lower_bounds(tile_queries, block_keys)
      ids = start + jnp.arange(block_size, dtype=jnp.int32)
      score = jnp.where(ids[None, :] < num_keys, score, jnp.inf)  # padding is never a neighbour
      values, positions = _smallest(score, per_block)
      return None, (values, positions.astype(jnp.int32) + start)

    _, (values, ids) = lax.scan(step, None, (blocks, starts))
    # [blocks, tile, per_block] -> [tile, blocks * per_block], blocks in ascending id order.
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
    return tile_topk(queries)
  values, ids = lax.map(tile_topk, queries.reshape(-1, query_tile, queries.shape[-1]))
  return values.reshape(-1, num_candidates), ids.reshape(-1, num_candidates)


def _make_search_fn(mesh, num_candidates: int, block_size: int, local_size: int,
                    query_tile: int):
  """Jitted candidates search for a mesh, candidate count, key layout and query tile."""
  axis = mesh_lib.DATA_AXIS

  def per_device(queries, num_keys, keys):
    offset = lax.axis_index(axis).astype(jnp.int32) * local_size
    return _local_topk(queries, num_keys, keys, num_candidates, block_size, offset, query_tile)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axis)),
                          out_specs=(P(None, axis), P(None, axis)), check_vma=False)

  @jax.jit
  def search(queries, num_keys, keys):
    bounds, index = sharded(queries, num_keys, keys)
    # Merge the per-device lists (the concatenation along axis 1) into the global smallest.
    neg, keep = lax.top_k(-bounds, num_candidates)
    return -neg, jnp.take_along_axis(index, keep, axis=1)

  return search


def _round_down(values) -> np.ndarray:
  """float32 no larger than ``values`` (float64, >= 0 or subnormal-small)."""
  return (np.asarray(values, np.float64) * (1.0 - 2.0 ** -22)).astype(np.float32)


def _round_up(values) -> np.ndarray:
  """float32 no smaller than ``values`` (float64, >= 0)."""
  return (np.asarray(values, np.float64) * (1.0 + 2.0 ** -22) + 2.0 ** -149).astype(np.float32)


class ShardedKeys:
  """Keys on a mesh: centred, scaled by a power of two (see scaling.py), padded to
  ``local_size`` rows per device and split along the data axis, each row augmented with its
  terms of the lower bound (:func:`lower_bounds`); the host keeps what the certificate needs.

  Placed with ``jax.make_array_from_callback``, so on several hosts each process puts only its
  own devices' rows (every process holds the same host array)."""

  def __init__(self, center, exponent, keys, sqnorms, norms):
    self.center, self.exponent, self.keys = center, exponent, keys
    self.sqnorms, self.norms = sqnorms, norms  # host, float64: |k'|^2 and a bound on |k'|
    self.dim = keys.shape[-1] - 2
    self.kappa = error_coefficient(self.dim)
    self.max_norm = float(norms.max()) if norms.size else 0.0

  @classmethod
  def place(cls, keys: np.ndarray, mesh, local_size: int) -> "ShardedKeys":
    size, dim = keys.shape
    center = scaling.center(keys)
    padded = np.zeros((local_size * mesh_lib.num_data_shards(mesh), dim + 2), np.float32)
    live = padded[:size, :dim]
    np.subtract(keys, center, out=live)
    exponent = scaling.key_exponent(live)
    np.ldexp(live, np.int32(-exponent), out=live)
    sqnorms = np.empty(size, np.float64)  # in float64: the stored norm errs by u only
    for start in range(0, size, 1 << 16):
      part = live[start:start + (1 << 16)].astype(np.float64)
      sqnorms[start:start + part.shape[0]] = np.einsum("nd,nd->n", part, part)
    norms = np.sqrt(sqnorms) * (1.0 + 2.0 ** -40)
    kappa = error_coefficient(dim)
    live *= -2.0  # exact: the matmul then gives -2 q.k directly
    padded[:size, dim] = _round_down(sqnorms * (1.0 - kappa))
    padded[:size, dim + 1] = -_round_up(2.0 * kappa * norms)
    sharding = NamedSharding(mesh, P(mesh_lib.DATA_AXIS))
    put = jax.make_array_from_callback(padded.shape, sharding, lambda i: padded[i])
    return cls(center, exponent, put, sqnorms, norms)

  def search_in_chunks(self, search, queries: np.ndarray, chunk: int, num_candidates: int,
                       size: int, calls_in_flight: int = 1, multiple: int = 1):
    """``(lower bounds float64, ids int32)``, each ``[q, num_candidates]`` and ascending by bound,
    from ``search(queries, num_keys, keys)`` called on fixed-size chunks of
    ``chunk`` queries (one compilation; a chunk is rounded up to a ``multiple`` of rows), up to
    ``calls_in_flight`` at once from a thread pool when the keys lie on this process's devices
    alone (a search whose collectives span hosts must be called in the same order on every
    process, so it runs one call at a time)."""
    mesh = self.keys.sharding.mesh
    replicated = mesh_lib.replicated(mesh)
    # make_array_from_callback: on several hosts each process places its own devices' copies.
    put = lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda i: x[i])
    num_keys = put(np.int32(size))
    chunk = max(1, min(chunk, queries.shape[0]))
    chunk = -(-chunk // multiple) * multiple
    out_bounds = np.empty((queries.shape[0], num_candidates), np.float64)
    out_ids = np.empty((queries.shape[0], num_candidates), np.int32)

    def run(start):
      rows = min(chunk, queries.shape[0] - start)
      part = self.queries(queries[start:start + chunk], chunk)
      bounds, ids = search(put(part), num_keys, self.keys)
      _, etas = self._query_terms(part[:rows, :self.dim])
      out_bounds[start:start + rows] = mesh_lib.to_host(bounds)[:rows] - etas[:, None]
      out_ids[start:start + rows] = mesh_lib.to_host(ids)[:rows]

    starts = range(0, queries.shape[0], chunk)
    process_local = all(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if calls_in_flight > 1 and len(starts) > 1 and process_local:
      with futures.ThreadPoolExecutor(min(calls_in_flight, len(starts))) as pool:
        list(pool.map(run, starts))  # re-raises a failed call's error here
    else:
      for start in starts:
        run(start)
    return out_bounds, out_ids

  def _scaled(self, queries: np.ndarray):
    """``(centred q - c in float32, scaled q', weights w)``."""
    centred = (queries - self.center).astype(np.float32, copy=False)
    part, weights = scaling.scaled_queries(centred, self.exponent)
    return centred, part, weights

  def _query_terms(self, part: np.ndarray):
    """float64 ``(|q'|, eta)`` per scaled query: ``eta`` is the absolute error that flushing
    subnormal results to zero can add (at most ``_NORMAL_MIN`` per operation whose result
    underflows: the d products, d - 1 sums, the key's norm and the bound's operations, plus
    inputs flushed on the device, ``<= sqrt(d) (|q'| + |k'|) _NORMAL_MIN``)."""
    wide = part.astype(np.float64)
    qnorms = np.sqrt(np.einsum("qd,qd->q", wide, wide))
    etas = 4.0 * _NORMAL_MIN * (2 * self.dim + 8 + np.sqrt(self.dim) * (qnorms + self.max_norm))
    return qnorms, etas

  def queries(self, queries: np.ndarray, rows: int):
    """Scaled queries augmented for :func:`lower_bounds`, ``[q', w, |q'| bound]``, ``[rows,
    d + 2]``, zero-padded to ``rows`` (fixed shape: one compilation per rows and candidates)."""
    _, part, weights = self._scaled(queries)
    qnorms, _ = self._query_terms(part)
    out = np.zeros((max(rows, part.shape[0]), self.dim + 2), np.float32)
    out[:part.shape[0], :self.dim] = part
    out[:part.shape[0], self.dim] = weights
    out[:part.shape[0], self.dim + 1] = _round_up(qnorms)
    return out

  def certified(self, queries: np.ndarray, bounds: np.ndarray, ids: np.ndarray, k: int):
    """Rows ``[q] bool`` whose k nearest keys are surely among ``ids`` (the keys of the smallest
    lower ``bounds``, ascending, as :meth:`search_in_chunks` returns them).

    The argument: every key left out has a lower bound of at least the list's last one, so a
    true distance of at least ``lo``; every listed key's true distance is at most its upper
    bound (lower bound + 3 x its error bound, which covers the error twice over and the rounding
    of the bound itself), so k listed keys lie within ``up``, the k-th smallest of those. If
    ``lo > up``, k listed keys are strictly nearer than every key left out. Distances are
    compared in float64 as ``sqrt(|q - c|^2 + 2**(m + e) bound)``; the rounding of ``q - c``
    itself moves the query by ``rho <= u |q - c|``, the same for every key, so it widens the
    comparison by ``2 rho``.
    """
    centred, part, _ = self._scaled(queries)
    wide = centred.astype(np.float64)
    base = np.einsum("qd,qd->q", wide, wide)[:, None]
    m = scaling.query_exponents(centred, self.exponent)
    unit = np.ldexp(1.0, m + self.exponent)  # 2**(m + e): score units -> squared distance
    weights = np.ldexp(1.0, self.exponent - m)
    qnorms, etas = self._query_terms(part)
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    errors = (self.kappa * (weights[:, None] * self.sqnorms[safe] + 2.0 * qnorms[:, None]
                            * self.norms[safe]) + etas[:, None])
    low = bounds
    high = np.where(valid, low + 3.0 * errors + 2 * _U * np.abs(low), np.inf)

    def distance(score, sign):  # sqrt(|q - c|^2 + unit * score), rounded outward
      squared = base + unit[:, None] * score
      slack = 2.0 ** -50 * (base + unit[:, None] * np.abs(score))
      return np.sqrt(np.maximum(squared + sign * slack, 0.0))

    rho = 1.01 * _U * np.sqrt(base[:, 0]) + np.sqrt(self.dim) * 2.0 ** -149
    kth = min(k, ids.shape[1]) - 1
    up = np.partition(distance(high, 1.0), kth, axis=1)[:, kth] + rho
    lo = distance(low[:, -1:], -1.0)[:, 0] - rho
    with np.errstate(invalid="ignore"):
      return lo > up


def certified_candidates(search, queries: np.ndarray, k: int, size: int,
                         layout: ShardedKeys, keys: np.ndarray) -> np.ndarray:
  """Ids ``[q, min(k + RERANK_MARGIN, size)]`` holding each query's k nearest keys (-1 beyond
  the first k where a row was widened), from ``search(queries, count) -> (bounds, ids)``.

  A row whose list :meth:`ShardedKeys.certified` cannot certify is searched again with
  :data:`WIDEN` times more candidates (all ``size`` keys certify trivially); past
  :data:`MAX_CANDIDATES` its distances to every key are computed directly. A widened row's
  candidates are re-ranked here, so the caller still gets a narrow list.
  """
  width = min(k + RERANK_MARGIN, size)
  out = np.full((queries.shape[0], width), -1, np.int32)
  rows = np.arange(queries.shape[0])
  count = width
  while rows.size:
    if size > count > MAX_CANDIDATES:
      out[rows, :k] = direct_nearest(queries[rows], keys, k)
      break
    count = min(count, size)
    bounds, ids = search(queries[rows], count)
    done = np.ones(len(rows), bool) if count == size else layout.certified(
        queries[rows], bounds, ids, k)
    if count == width:
      out[rows[done]] = ids[done]
    elif done.any():
      out[rows[done], :k] = rerank_exact(queries[rows[done]], keys, ids[done], k)[1]
    rows = rows[~done]
    count *= WIDEN
  return out


def direct_nearest(queries: np.ndarray, keys: np.ndarray, k: int, key_chunk: int = 2048,
                   query_chunk: int = 32) -> np.ndarray:
  """Ids ``[q, k]`` of the k nearest keys by distances computed directly from ``q - k`` for every
  key (:func:`rerank_exact` over the keys a chunk at a time, keeping the best k so far): the
  fallback for queries whose expansion scores cannot be certified."""
  best = np.zeros((queries.shape[0], 0), np.int32)
  for start in range(0, keys.shape[0], key_chunk):
    chunk = np.arange(start, min(start + key_chunk, keys.shape[0]), dtype=np.int32)
    ids = np.concatenate([best, np.broadcast_to(chunk, (queries.shape[0], chunk.size))], axis=1)
    best = rerank_exact(queries, keys, ids, min(k, ids.shape[1]), chunk=query_chunk)[1]
  return best


# Defaults by the platform of the index's devices. On CPU (measured on 2 cores, BUILD_NOTES.md,
# issue 12, "CPU `exact`, session 5"): tiles of 128 queries against 16k keys keep each tile's scores (8 MB) in cache,
# and a second call in flight overlaps one call's single-core lax.top_k with the other's matmul.
# Accelerators keep the large blocks they were built with and one call at a time.
CPU_DEFAULTS = {"block_size": 16384, "query_chunk": 1024, "query_tile": 128, "calls_in_flight": 2}
ACCELERATOR_DEFAULTS = {"block_size": 8192, "query_chunk": 1024, "query_tile": 1024,
                        "calls_in_flight": 1}


def defaults_for_platform(platform: str) -> dict:
  """The unset options' values on devices of ``platform`` (``Device.platform``: 'cpu', 'gpu',
  'tpu', ...): the CPU's measured ones on 'cpu', the accelerators' on any other."""
  return dict(CPU_DEFAULTS if platform == "cpu" else ACCELERATOR_DEFAULTS)


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
    settings = {**defaults_for_platform(self.mesh.devices.flat[0].platform), **self.options}
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
    self._keys = keys  # the host keys: re-ranking widened rows and the direct fallback

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
  def build(cls, keys, options: dict) -> ExactIndex:
    return cls(keys.float32(), **cls.check_options(options))

  def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids ``[q, min(k + RERANK_MARGIN, size)]`` that surely hold each query's k nearest keys
    (see :func:`certified_candidates`)."""
    tile = max(1, min(self.query_tile, self.query_chunk, queries.shape[0]))

    def search(rows: np.ndarray, count: int):
      layout = (count, self.block_size, self.local_size, tile)
      fn = index_lib.bounded_put(self._search_fns, layout,
                                 lambda: _make_search_fn(self.mesh, *layout), MAX_SEARCH_FNS)
      return self._layout.search_in_chunks(fn, rows, self.query_chunk, count, self.size,
                                           calls_in_flight=self.calls_in_flight, multiple=tile)

    return certified_candidates(search, queries, k, self.size, self._layout, self._keys)

  def extend(self, keys) -> ExactIndex:
    return ExactIndex(keys.float32(), devices=list(self.mesh.devices.flat), search_fns=self._search_fns,
                      **self.options)

  def save(self, directory: str) -> dict:
    del directory  # rebuilt from the keys on load: nothing to write
    return dict(self.options)

  @classmethod
  def load(cls, directory: str, keys, info: dict) -> ExactIndex:
    del directory
    index_lib.check_option_names("exact index info", info, cls._SAVED)
    return cls.build(keys, info)


# Squared distances below this may have lost digits to float32 underflow; with overflowed ones
# (inf) they are computed again in float64.
_TINY_SQUARED = 2.0 ** -100


# Candidates per query beyond which the re-rank first keeps the nearest k + PRESELECT_MARGIN by
# distance alone (a partial sort) and orders only those: an index that returns a deep candidate
# list (scann's AH candidates) then costs one gather and one distance per candidate.
PRESELECT_MARGIN = 32
# Floats of gathered keys per re-rank step: a few MB keeps them in cache whatever the depth.
RERANK_FLOATS = 1 << 20
# Candidates (queries x per query) from which a re-rank runs its chunks on several threads.
RERANK_PARALLEL_CANDIDATES = 1 << 16
# Queries per call of the compiled kernel: bounds its [queries, candidates] float32 output.
KERNEL_QUERIES = 8192


def rerank_exact(queries: np.ndarray, keys, candidates: np.ndarray, k: int,
                 chunk: int | None = None, compiled: bool | None = None):
  """Sorts candidate ids by directly computed Euclidean distance; keeps the first k.

  ``keys``: float32 ``[n, d]``, or a :class:`~resmem_jax.memory.keys.KeyStore` (its rows as
  stored, decoded). ``candidates`` may hold -1 (no candidate; so does any id outside
  ``[0, len(keys))``); those sort last at distance inf. Ties go to the lower index. Distances come
  from the differences ``q - k`` (float32), so they carry relative, not absolute, rounding error: a
  query equal to a key gets distance exactly 0. Sums of squares that overflow float32 (entries
  beyond about 1e19) or could have underflowed are recomputed in float64, so every distance of
  keys and queries within :data:`~resmem_jax.memory.scaling.MAX_MAGNITUDE` is finite and accurate.
  Small chunks keep the gathered keys in cache; the gather is the cost of exactness (random rows:
  memory-bound), so chunks run on a thread per core (NumPy releases the GIL in them).
  ``compiled``: compute the squared distances with :mod:`resmem_jax.memory.rerank_kernel` (one
  pass per candidate, numba) instead of NumPy's passes; None: when numba is installed. The
  results agree up to float32 rounding of the sums.
  """
  take = (lambda ids: np.take(keys, ids, axis=0)) if isinstance(keys, np.ndarray) else keys.take
  size = len(keys)
  num_queries, width = candidates.shape
  if chunk is None:
    chunk = max(1, min(512, RERANK_FLOATS // max(1, width * queries.shape[1])))
  if compiled is None:
    compiled = rerank_kernel.AVAILABLE
  elif compiled and not rerank_kernel.AVAILABLE:
    raise ValueError("rerank_exact(compiled=True) needs numba: pip install 'resmem_jax[fast]'")
  out_dist = np.empty((num_queries, k), np.float32)
  out_index = np.empty((num_queries, k), np.int32)

  def rerank_chunk(start: int, squared: np.ndarray | None = None) -> None:
    """Queries ``start:start + chunk``; ``squared``: their squared distances, if computed."""
    part = queries[start:start + chunk]
    ids = candidates[start:start + chunk]
    valid = (ids >= 0) & (ids < size)
    if squared is None:
      diff = take(np.where(valid, ids, 0))
      np.subtract(diff, part[:, None, :], out=diff)
      squared = np.einsum("qkd,qkd->qk", diff, diff)
    redo = valid & ~((squared >= _TINY_SQUARED) & (squared < np.inf))
    dist = np.sqrt(squared)
    if redo.any():
      rows, columns = np.nonzero(redo)
      wide = take(ids[rows, columns]).astype(np.float64) - part[rows].astype(np.float64)
      dist[rows, columns] = np.sqrt(np.einsum("pd,pd->p", wide, wide))
    dist[~valid] = np.inf
    ids = np.where(valid, ids, -1)
    if width > k + PRESELECT_MARGIN:
      kept = np.argpartition(dist, k + PRESELECT_MARGIN - 1, axis=1)[:, :k + PRESELECT_MARGIN]
      dist, ids = np.take_along_axis(dist, kept, axis=1), np.take_along_axis(ids, kept, axis=1)
      valid = ids >= 0
    # Sort by (distance, index): the lexsort key order is last-key-primary.
    order = np.lexsort((np.where(valid, ids, np.iinfo(np.int32).max), dist), axis=-1)[:, :k]
    out_dist[start:start + chunk] = np.take_along_axis(dist, order, axis=1)
    out_index[start:start + chunk] = np.take_along_axis(ids, order, axis=1)

  def rerank_queries(first: int, stop: int, squared: np.ndarray | None = None) -> None:
    """Queries ``first:stop`` chunk by chunk; ``squared``: theirs ``[stop - first, width]``."""
    def run(start: int) -> None:
      rerank_chunk(start, None if squared is None
                   else squared[start - first:start - first + chunk])

    starts = range(first, stop, chunk)
    workers = min(os.cpu_count() or 1, len(starts))
    if workers > 1 and (stop - first) * width >= RERANK_PARALLEL_CANDIDATES:
      with futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, starts))
    else:
      for start in starts:
        run(start)

  if not compiled:
    rerank_queries(0, num_queries)
    return out_dist, out_index
  # The kernel spreads its queries over the cores itself; the selection runs in chunks as above.
  step = max(chunk, KERNEL_QUERIES // chunk * chunk)
  for first in range(0, num_queries, step):
    stop = min(num_queries, first + step)
    ids = candidates[first:stop]
    squared = rerank_kernel.squared_distances(queries[first:stop], keys,
                                              np.where((ids >= 0) & (ids < size), ids, 0))
    rerank_queries(first, stop, squared)
  return out_dist, out_index
