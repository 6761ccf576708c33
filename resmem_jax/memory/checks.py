"""Checks of the arrays and counts a memory is given (one place, so every entry point agrees)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from resmem_jax.memory import scaling


def float_matrix(value, name: str, allow_empty: bool = False, copy: bool = True) -> np.ndarray:
  """``value`` as a finite float32 ``[n, dim]`` array, or ValueError naming ``name``."""
  array = np.asarray(value)
  if not (np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16):
    raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
  if array.ndim != 2:
    raise ValueError(f"{name} must be 2-D [n, dim], got shape {array.shape}")
  if array.shape[0] == 0 and not allow_empty:
    raise ValueError(f"{name} is empty (0 rows); a memory needs at least one example")
  if array.shape[1] == 0:
    raise ValueError(f"{name} has 0 columns (shape {array.shape}); give at least one "
                     f"{'output' if name == 'residuals' else 'dimension'} per row")
  # Stored arrays are copied (a caller may mutate theirs later); queries need not be.
  array = array.astype(np.float32, copy=copy)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} contains NaN or inf")
  return array


def vectors(value, name: str, allow_empty: bool = False, copy: bool = True) -> np.ndarray:
  """Keys or queries: :func:`float_matrix` with every entry at most
  :data:`~resmem_jax.memory.scaling.MAX_MAGNITUDE` in magnitude (larger ones could have distances
  beyond float32's range)."""
  array = float_matrix(value, name, allow_empty, copy)
  if array.size and max(float(array.max()), -float(array.min())) > scaling.MAX_MAGNITUDE:
    row, column = np.unravel_index(np.argmax(np.abs(array)), array.shape)
    largest = float(abs(array[row, column]))
    raise ValueError(f"{name} has an entry of magnitude {largest:.3g} (row {row}, column "
                     f"{column}), above the limit 2**100 = {scaling.MAX_MAGNITUDE:.3g} beyond "
                     "which float32 distances can overflow; scale the embeddings down")
  return array


def queries(value, dim: int) -> np.ndarray:
  """Float32 queries ``[q, dim]`` (q may be 0)."""
  array = vectors(value, "queries", allow_empty=True, copy=False)
  if array.shape[1] != dim:
    raise ValueError(f"queries have dimension {array.shape[1]} but the memory keys have {dim}")
  return array


def neighbour_count(k, size: int) -> int:
  """``k`` as an int in ``[1, size]``."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"k must be an integer, got {k!r}")
  if k < 1 or k > size:
    raise ValueError(f"k must be in [1, {size}] (the memory size), got {k}")
  return int(k)


def row_ids(ids, size: int) -> np.ndarray:
  """Integer memory row ids, all in ``[0, size)``."""
  ids = np.asarray(ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"indices must be integers, got dtype {ids.dtype}")
  if ids.size and (ids.min() < 0 or ids.max() >= size):
    raise ValueError(f"indices must lie in [0, {size}), got range [{ids.min()}, {ids.max()}]")
  return ids


def labels(value, n: int, num_outputs: int) -> np.ndarray:
  """What each of ``n`` keys memorizes, as int32 ``[n]`` in ``[0, num_outputs)``."""
  array = np.asarray(value)
  if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got shape {array.shape} dtype "
                     f"{array.dtype}")
  if array.shape[0] != n:
    raise ValueError(f"labels has {array.shape[0]} entries but keys has {n} rows")
  if array.size and (array.min() < 0 or array.max() >= num_outputs):
    raise ValueError(f"labels must lie in [0, {num_outputs}) (the residual width), got range "
                     f"[{array.min()}, {array.max()}]")
  return array.astype(np.int32)
