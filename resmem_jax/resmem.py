"""ResMem's prediction from a memory, on your own arrays (the array-level API).

    pred = resmem_jax.predict(memory, base_probs, test_embeddings, k=16, sigma=0.5)

A thin bridge between a :class:`~resmem_jax.memory.Memory` (which finds neighbours and returns
their residual rows) and the rule in :mod:`resmem_jax.core.predictor` (which combines them).
Queries go in chunks so a large query set never holds all ``[q, k, C]`` neighbour rows at once.
"""
from __future__ import annotations

import jax
import numpy as np

from resmem_jax.core import predictor

# Queries per chunk: bounds the gathered neighbour residual rows held at once.
QUERY_CHUNK = 4096


@jax.jit
def _combine(base, distances, sigma, values, columns):
  weights = predictor.neighbour_weights(distances, sigma)
  return predictor.resmem_prediction(base, weights, values, columns)


def combine(base, distances, rows, sigma) -> np.ndarray:
  """``base + sum_i w_i r_i`` from neighbour ``distances [q, k]`` and their residual ``rows``
  (``(values, columns)`` as returned by ``Memory.residual_rows``), float32 ``[q, C]``."""
  values, columns = rows
  return np.asarray(_combine(np.asarray(base, np.float32), np.asarray(distances, np.float32),
                             np.float32(sigma), values, columns))


def _float_rows(name: str, array, width: int | None = None) -> np.ndarray:
  array = np.asarray(array)
  # Complex numbers are refused: the cast to float32 below would drop their imaginary part.
  if array.ndim != 2 or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
    raise ValueError(f"{name} must be a real-valued numeric [n, d] array, got shape "
                     f"{array.shape} dtype {array.dtype}")
  if width is not None and array.shape[1] != width:
    raise ValueError(f"{name} has {array.shape[1]} columns, expected {width}")
  array = array.astype(np.float32, copy=False)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} contains NaN or inf")
  return array


def predict(memory, base, queries, k: int, sigma) -> np.ndarray:
  """ResMem's prediction ``base + sum_i softmax(-d_i / sigma) r_i`` over the k nearest keys.

  Args:
    memory: a :class:`~resmem_jax.memory.Memory`.
    base: the base model's prediction ``p = softmax(z / T)`` ``[q, C]`` (T as the residuals').
    queries: embeddings ``[q, d]``.
    k: neighbours per query; sigma: the softmax temperature of the neighbour weights (> 0).
  """
  sigma = predictor.check_sigma(sigma)
  base = _float_rows("base", base, memory.num_outputs)
  queries = _float_rows("queries", queries, memory.dim)
  if base.shape[0] != queries.shape[0]:
    raise ValueError(f"base has {base.shape[0]} rows but queries has {queries.shape[0]}")
  out = np.empty(base.shape, np.float32)
  for start in range(0, queries.shape[0], QUERY_CHUNK):
    rows = slice(start, start + QUERY_CHUNK)
    distances, ids = memory.search(queries[rows], k)
    out[rows] = combine(base[rows], distances, memory.residual_rows(ids), sigma)
  return out


def residual_estimate(memory, queries, k: int, sigma) -> np.ndarray:
  """The memory's estimate ``sum_i softmax(-d_i / sigma) r_i`` alone, float32 ``[q, C]``."""
  queries = np.asarray(queries)
  return predict(memory, np.zeros((queries.shape[0], memory.num_outputs), np.float32), queries,
                 k, sigma)

