"""Squared distances from each query to its candidates' stored keys, one compiled pass each (numba).

The memory's exact re-rank (:func:`resmem_jax.memory.exact.rerank_exact`) costs most of a compact
memory's query time. NumPy makes five or six passes over a ``[queries, candidates, d]`` float32
temporary (decode, scale, add the centroid rows, subtract the query, square and sum). These
kernels make one pass per candidate over its stored row, with queries spread over the cores
(BUILD_NOTES.md, issue 21: 2-3x NumPy's speed at 400-1,600 candidates).

numba is optional (``pip install 'resmem_jax[fast]'``). Without it :data:`AVAILABLE` is False and
the re-rank stays in NumPy, with the same results up to float32 rounding. The kernels allow only
reassociation and contraction (so that the sum of squares vectorizes). Infinities and NaNs keep
their IEEE meaning, so a sum that overflows is inf and the caller recomputes it in float64.
16-bit codes (bfloat16 bits, float16) are decoded through a 65,536-entry float32 table.
"""
from __future__ import annotations

import threading

import numpy as np

try:
  import numba  # pylint: disable=g-import-not-at-top
except ImportError:  # the NumPy re-rank is used instead
  numba = None  # type: ignore[assignment]

AVAILABLE = numba is not None
# Reassociation lets the compiler vectorize the sum of squares; no-NaN / no-inf flags stay off.
_FASTMATH = {"reassoc", "contract"}
# numba's default (workqueue) thread pool must not be entered from two threads at once.
_KERNEL_LOCK = threading.Lock()


def _float32_rows(queries, ids, codes):
  num, width = ids.shape
  out = np.empty((num, width), np.float32)
  for i in numba.prange(num):  # pylint: disable=not-an-iterable
    for c in range(width):
      row = ids[i, c]
      total = np.float32(0)
      for t in range(queries.shape[1]):
        v = codes[row, t] - queries[i, t]
        total += v * v
      out[i, c] = total
  return out


def _int8_rows(queries, ids, codes, scales, centroid_ids, centroids):
  num, width = ids.shape
  out = np.empty((num, width), np.float32)
  for i in numba.prange(num):  # pylint: disable=not-an-iterable
    for c in range(width):
      row = ids[i, c]
      scale, centre = scales[row], centroid_ids[row]
      total = np.float32(0)
      for t in range(queries.shape[1]):
        v = scale * np.float32(codes[row, t]) + centroids[centre, t] - queries[i, t]
        total += v * v
      out[i, c] = total
  return out


def _sixteen_bit_rows(queries, ids, bits, table, scales, centroid_ids, centroids):
  num, width = ids.shape
  out = np.empty((num, width), np.float32)
  for i in numba.prange(num):  # pylint: disable=not-an-iterable
    for c in range(width):
      row = ids[i, c]
      scale, centre = scales[row], centroid_ids[row]
      total = np.float32(0)
      for t in range(queries.shape[1]):
        v = scale * table[bits[row, t]] + centroids[centre, t] - queries[i, t]
        total += v * v
      out[i, c] = total
  return out


def _sixteen_bit_unscaled_rows(queries, ids, bits, table, centroid_ids, centroids):
  num, width = ids.shape
  out = np.empty((num, width), np.float32)
  for i in numba.prange(num):  # pylint: disable=not-an-iterable
    for c in range(width):
      row = ids[i, c]
      centre = centroid_ids[row]
      total = np.float32(0)
      for t in range(queries.shape[1]):
        v = table[bits[row, t]] + centroids[centre, t] - queries[i, t]
        total += v * v
      out[i, c] = total
  return out


# float32 value of every 16-bit pattern (256 KB each; built only where the kernels can run).
_FLOAT16_TABLE = _BFLOAT16_TABLE = np.zeros(0, np.float32)
if AVAILABLE:
  # cache=True: each process loads the machine code numba compiled before (about 1 s a kernel
  # otherwise), kept in __pycache__ beside this file or numba's user-wide cache folder
  # (NUMBA_CACHE_DIR), and compiled again when this file changes.
  _compile = numba.njit(parallel=True, fastmath=_FASTMATH, nogil=True, cache=True)
  _float32_rows = _compile(_float32_rows)
  _int8_rows = _compile(_int8_rows)
  _sixteen_bit_rows = _compile(_sixteen_bit_rows)
  _sixteen_bit_unscaled_rows = _compile(_sixteen_bit_unscaled_rows)
  _FLOAT16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
  _BFLOAT16_TABLE = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)


def squared_distances(queries: np.ndarray, keys, ids: np.ndarray) -> np.ndarray:
  """float32 ``[q, w]``: ``|queries[i] - key[ids[i, c]]|^2`` for valid row numbers ``ids``.

  ``keys``: float32 ``[n, d]`` or a :class:`~resmem_jax.memory.keys.KeyStore` (rows as stored,
  decoded). Needs numba (:data:`AVAILABLE`).
  """
  if not AVAILABLE:
    raise RuntimeError("the compiled re-rank needs numba: pip install 'resmem_jax[fast]'")
  queries = np.ascontiguousarray(queries, np.float32)
  ids = np.ascontiguousarray(ids, np.int64)
  with _KERNEL_LOCK:
    if isinstance(keys, np.ndarray):
      return _float32_rows(queries, ids, keys)
    if keys.format == "float32":
      return _float32_rows(queries, ids, keys.codes)
    if keys.format == "int8":
      return _int8_rows(queries, ids, keys.codes, keys.scales, keys.centroid_ids, keys.centroids)
    bits = keys.codes.view(np.uint16)
    if keys.format == "float16":
      return _sixteen_bit_rows(queries, ids, bits, _FLOAT16_TABLE, keys.scales,
                               keys.centroid_ids, keys.centroids)
    return _sixteen_bit_unscaled_rows(queries, ids, bits, _BFLOAT16_TABLE, keys.centroid_ids,
                                      keys.centroids)
