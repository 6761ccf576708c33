"""``approx``: the on-device memory, nearest neighbours by ``jax.lax.approx_min_k`` (TPU-KNN).

The keys are split over every device of every host (one mesh over ``jax.devices()``); each
device scores the queries against its own keys with one matmul, as a proven lower bound of the
squared distance (:func:`~resmem_jax.memory.exact.lower_bounds`, on centred, power-of-two scaled
keys: see :class:`~resmem_jax.memory.exact.ShardedKeys`), and keeps its approximate top candidates
with ``approx_min_k``, the TPU-native partial reduction built to run near the accelerator's peak
FLOP/s; the per-device lists are merged into one exact top list across devices. Each query's list
is then certified against float32 rounding as ``exact``'s is (widened, or searched directly, where
rounding could have dropped a neighbour: :func:`~resmem_jax.memory.exact.certified_candidates`),
so only ``approx_min_k``'s own selection is approximate; where it is exact (CPU) the backend
returns ``exact``'s neighbours. The memory then re-ranks the candidates by directly computed
distance as for every backend.

Options: ``recall_target`` (``approx_min_k``'s expected recall per device, default 0.95),
``query_chunk`` (queries per call; each call holds ``query_chunk x keys per device`` scores),
``across_hosts`` (default True: the devices of every process, so every process must build and
query it alike with the same keys; False: this process's devices only, as in a
:mod:`~resmem_jax.memory.hosts` memory) and ``devices`` (an explicit list; not saved). On CPU and GPU ``approx_min_k`` runs an exact (and slower) reduction, so this backend
is for TPUs; on CPU it equals ``exact``, which the tests use to check it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from resmem_jax import mesh as mesh_lib
from resmem_jax.memory import index as index_lib
from resmem_jax.memory.exact import (MAX_SEARCH_FNS, ShardedKeys,
                                     certified_candidates, lower_bounds)

# Scores one call may hold per device (query_chunk x keys per device): 2**27 floats is 512 MB.
MAX_SCORES_PER_CALL = 1 << 27


def _make_search_fn(mesh, num_candidates: int, local_size: int, recall_target: float):
  """Jitted search: per-device ``approx_min_k`` over the lower bounds of the device's keys
  (:func:`~resmem_jax.memory.exact.lower_bounds`), then an exact merge."""
  axis = mesh_lib.DATA_AXIS
  per_device_k = min(num_candidates, local_size)

  def per_device(queries, num_keys, keys):
    offset = lax.axis_index(axis).astype(jnp.int32) * local_size
    scores = lower_bounds(queries, keys)
    ids = offset + jnp.arange(local_size, dtype=jnp.int32)
    scores = jnp.where(ids[None, :] < num_keys, scores, jnp.inf)  # padding is never a neighbour
    values, positions = lax.approx_min_k(scores, per_device_k, recall_target=recall_target)
    return values, positions.astype(jnp.int32) + offset

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axis)),
                          out_specs=(P(None, axis), P(None, axis)), check_vma=False)

  @jax.jit
  def search(queries, num_keys, keys):
    values, ids = sharded(queries, num_keys, keys)
    neg, keep = lax.top_k(-values, num_candidates)  # the global merge of the device lists
    return -neg, jnp.take_along_axis(ids, keep, axis=1)

  return search


class ApproxIndex(index_lib.SearchIndex):
  """Keys on every device, ``approx_min_k`` per device, one merged candidate list per query."""

  OPTION_NAMES = ("recall_target", "query_chunk", "across_hosts", "devices")

  def __init__(self, keys: np.ndarray, recall_target: float = 0.95, query_chunk: int = 1024,
               across_hosts: bool = True, devices=None, search_fns: dict | None = None):
    if devices is None:
      devices = jax.devices() if across_hosts else jax.local_devices()
    self.mesh = mesh_lib.data_mesh(list(devices))
    self.options = {"recall_target": float(recall_target), "query_chunk": int(query_chunk),
                    "across_hosts": bool(across_hosts)}
    self.size = keys.shape[0]
    shards = mesh_lib.num_data_shards(self.mesh)
    self.local_size = max(1, -(-self.size // shards))
    self._layout = ShardedKeys.place(keys, self.mesh, self.local_size)
    self._keys = keys  # the host keys: re-ranking widened rows and the direct fallback
    self._search_fns = {} if search_fns is None else search_fns

  @classmethod
  def check_options(cls, options: dict) -> dict:
    index_lib.check_option_names("approx backend options", options, cls.OPTION_NAMES)
    checked = {}
    if "recall_target" in options:
      value = options["recall_target"]
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"approx option recall_target must be in (0, 1], got {value!r}")
      checked["recall_target"] = float(value)
    if "query_chunk" in options:
      checked["query_chunk"] = index_lib.integer_option("approx", "query_chunk",
                                                        options["query_chunk"], 1)
    if "across_hosts" in options:
      value = options["across_hosts"]
      # 1 and 0 find True and False (equal, same hash); 1.0 and 0.0 are refused below.
      flags = {True: True, False: False, "true": True, "false": False}
      key = value.lower() if isinstance(value, str) else value
      if isinstance(value, float) or key not in flags:
        raise ValueError(f"approx option across_hosts must be true or false, got {value!r}")
      checked["across_hosts"] = flags[key]
    if "devices" in options:
      checked["devices"] = index_lib.devices_option("approx", options["devices"])
    return checked

  @classmethod
  def build(cls, keys, options: dict) -> ApproxIndex:
    return cls(keys.float32(), **cls.check_options(options))

  def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids ``[q, min(k + RERANK_MARGIN, size)]`` (approximately the nearest; with rounding
    certified as for ``exact``, see :func:`~resmem_jax.memory.exact.certified_candidates`)."""
    chunk = max(1, min(self.options["query_chunk"], MAX_SCORES_PER_CALL // self.local_size))

    def search(rows: np.ndarray, count: int):
      fn = index_lib.bounded_put(
          self._search_fns, (count, self.local_size),
          lambda: _make_search_fn(self.mesh, count, self.local_size,
                                  self.options["recall_target"]), MAX_SEARCH_FNS)
      return self._layout.search_in_chunks(fn, rows, chunk, count, self.size)

    return certified_candidates(search, queries, k, self.size, self._layout, self._keys)

  def extend(self, keys) -> ApproxIndex:
    return ApproxIndex(keys.float32(), devices=list(self.mesh.devices.flat), search_fns=self._search_fns,
                       **self.options)

  def save(self, directory: str) -> dict:
    del directory  # rebuilt from the keys on load: nothing to write
    return dict(self.options)

  @classmethod
  def load(cls, directory: str, keys, info: dict) -> ApproxIndex:
    del directory
    index_lib.check_option_names("approx index info", info,
                                 ("recall_target", "query_chunk", "across_hosts"))
    return cls.build(keys, info)
