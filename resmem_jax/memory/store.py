"""How residuals are stored beside the keys: dense float32, bfloat16, or sparse top-m.

``dense``     float32 ``[n, C]``; exact. 4*C bytes per example.
``bfloat16``  ``[n, C]`` rounded to bfloat16 (8 significant bits): each entry is off by at most
              ``2**-8 * |r|`` (round to nearest), i.e. <= 2**-8 for classification residuals.
              2*C bytes per example.
``sparse``    per example the ``m + 1`` entries at the true label (``argmax r``) and at the ``m``
              largest base probabilities (the ``m`` most negative residuals), float32 values with
              uint16/int32 class ids; every other entry is taken as 0. For a classification
              residual ``r = onehot(y) - p`` a dropped entry equals ``-p_j`` with ``p_j`` no larger
              than the (m+1)-th largest probability, so each entry is off by at most
              ``p_(m+1) <= 1 / (m + 1)`` and the L1 error of an example is the dropped probability
              mass. The ResMem estimate is a convex combination, so its per-entry error is at most
              the largest per-entry error of the neighbours used. ``(m + 1) * (4 + 2)`` bytes per
              example when C <= 65536.
``sparse_float16``  ``sparse`` with float16 values (11 significant bits: each stored entry off by
              at most ``2**-12`` more, entries being at most 1 in magnitude); ``(m + 1) * (2 + 2)``
              bytes per example. The compact memory's format (issue 21).

The sparse selection is :func:`resmem_jax.core.residuals.sparse_top_m`, the same function the
inference pass runs on the device, so a store built here from dense rows and one built from the
device's arrays (:func:`store_from_arrays`) hold the same entries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax.core import residuals as residuals_lib

FORMATS = ("dense", "bfloat16", "sparse", "sparse_float16")
SPARSE_FORMATS = ("sparse", "sparse_float16")
_SPARSE_VALUE_DTYPES = {"sparse": np.float32, "sparse_float16": np.float16}
# Dense entries per sparse-selection call: bounds the temporaries for a large vocabulary.
SPARSE_CHUNK_ELEMENTS = 1 << 24

_sparse_top_m = jax.jit(residuals_lib.sparse_top_m, static_argnames="top_m")


def _sparse_id_dtype(num_outputs: int):
  return np.uint16 if num_outputs <= 65536 else np.int32


class DenseStore:
  """float32 (``dense``) or bfloat16 (``bfloat16``) rows ``[n, C]``."""

  def __init__(self, values: np.ndarray, residual_format: str):
    self.format = residual_format
    self.values = values  # float32 or bfloat16 [n, C]

  @classmethod
  def from_dense(cls, residuals: np.ndarray, residual_format: str) -> DenseStore:
    dtype = np.float32 if residual_format == "dense" else jnp.bfloat16
    return cls(np.asarray(residuals).astype(dtype), residual_format)

  @property
  def num_outputs(self) -> int:
    return self.values.shape[1]

  def __len__(self) -> int:
    return self.values.shape[0]

  def append(self, residuals: np.ndarray) -> None:
    self.values = np.concatenate([self.values, np.asarray(residuals).astype(self.values.dtype)])

  def rows(self, ids: np.ndarray):
    """``(values float32 [..., C], None)``."""
    return self.gather(ids), None

  def gather(self, ids: np.ndarray) -> np.ndarray:
    return self.values[ids].astype(np.float32)

  def bytes_per_example(self) -> float:
    return float(self.values.itemsize * self.num_outputs)

  def arrays(self) -> dict:
    # numpy cannot write bfloat16 natively: keep its bit pattern as uint16.
    if self.format == "bfloat16":
      return {"residuals": self.values.view(np.uint16)}
    return {"residuals": self.values}

  @classmethod
  def from_arrays(cls, arrays: dict, residual_format: str, num_outputs: int) -> DenseStore:
    values = np.asarray(arrays["residuals"])
    if residual_format == "bfloat16":
      if values.dtype == np.uint16:
        values = values.view(jnp.bfloat16)
      elif values.dtype != jnp.bfloat16:
        raise ValueError(f"residuals array has dtype {values.dtype}, expected uint16 bfloat16 bits")
    elif values.dtype != np.float32:
      raise ValueError(f"residuals array has dtype {values.dtype}, expected float32")
    if values.ndim != 2 or values.shape[1] != num_outputs:
      raise ValueError(f"residuals array has shape {values.shape}, expected [n, {num_outputs}]")
    return cls(values, residual_format)


class SparseStore:
  """``m + 1`` (class id, value) pairs per example; everything else is zero."""

  def __init__(self, columns: np.ndarray, values: np.ndarray, num_outputs: int, top_m: int,
               residual_format: str = "sparse"):
    self.format = residual_format
    self.columns = columns  # uint16 / int32 [n, m + 1]
    self.values = values.astype(_SPARSE_VALUE_DTYPES[residual_format], copy=False)  # [n, m + 1]
    self.top_m = int(top_m)
    self._num_outputs = int(num_outputs)

  @classmethod
  def from_dense(cls, residuals: np.ndarray, top_m: int,
                 residual_format: str = "sparse") -> SparseStore:
    num_outputs = residuals.shape[1]
    width = min(int(top_m), num_outputs - 1) + 1
    store = cls(np.zeros((0, width), _sparse_id_dtype(num_outputs)),
                np.zeros((0, width), np.float32), num_outputs, top_m, residual_format)
    store.append(residuals)
    return store

  @property
  def num_outputs(self) -> int:
    return self._num_outputs

  def __len__(self) -> int:
    return self.values.shape[0]

  def append(self, residuals: np.ndarray) -> None:
    residuals = np.asarray(residuals, np.float32)
    rows = max(1, SPARSE_CHUNK_ELEMENTS // max(1, self._num_outputs))
    columns, values = [self.columns], [self.values]
    for start in range(0, residuals.shape[0], rows):
      c, v = _sparse_top_m(residuals[start:start + rows], top_m=self.top_m)
      columns.append(np.asarray(c).astype(self.columns.dtype))
      values.append(np.asarray(v).astype(self.values.dtype))
    self.columns = np.concatenate(columns)
    self.values = np.concatenate(values)

  def rows(self, ids: np.ndarray):
    """``(values float32 [..., m + 1], columns int32 [..., m + 1])``."""
    return self.values[ids].astype(np.float32, copy=False), self.columns[ids].astype(np.int32)

  def gather(self, ids: np.ndarray) -> np.ndarray:
    columns = self.columns[ids].astype(np.int64)
    dense = np.zeros(np.shape(ids) + (self._num_outputs,), np.float32)
    np.put_along_axis(dense, columns, self.values[ids].astype(np.float32), axis=-1)
    return dense

  def bytes_per_example(self) -> float:
    return float(self.columns.shape[1] * (self.columns.itemsize + self.values.itemsize))

  def arrays(self) -> dict:
    return {"sparse_columns": self.columns, "sparse_values": self.values}

  @classmethod
  def from_arrays(cls, arrays: dict, num_outputs: int, top_m,
                  residual_format: str = "sparse") -> SparseStore:
    """The store of ``arrays``: float32 values (as the device computes them, converted to the
    format's) or the format's own (as saved)."""
    columns, values = np.asarray(arrays["sparse_columns"]), np.asarray(arrays["sparse_values"])
    if isinstance(top_m, bool) or not isinstance(top_m, (int, np.integer)) or top_m < 1:
      raise ValueError(f"top_m must be a positive integer for the sparse format, got {top_m!r}")
    width = min(int(top_m), num_outputs - 1) + 1
    if columns.shape != values.shape or columns.ndim != 2 or columns.shape[1] != width:
      raise ValueError(f"sparse residual arrays have shapes {columns.shape}, {values.shape}; "
                       f"expected [n, {width}] each")
    allowed = {np.dtype(np.float32), np.dtype(_SPARSE_VALUE_DTYPES[residual_format])}
    if values.dtype not in allowed or not np.issubdtype(columns.dtype, np.integer):
      raise ValueError(f"sparse residual arrays have dtypes {columns.dtype}, {values.dtype}; "
                       f"expected integer class ids and {' or '.join(sorted(map(str, allowed)))} "
                       "values")
    if columns.size and (int(columns.min()) < 0 or int(columns.max()) >= num_outputs):
      raise ValueError(f"sparse residual class ids span [{int(columns.min())}, "
                       f"{int(columns.max())}], outside [0, {num_outputs})")
    # The device computes int32 ids; keep the compact type (6 instead of 8 bytes per entry).
    return cls(columns.astype(_sparse_id_dtype(num_outputs), copy=False), values, num_outputs,
               int(top_m), residual_format)


def array_names(residual_format: str) -> list[str]:
  """The arrays a store of ``residual_format`` is saved as."""
  if residual_format in SPARSE_FORMATS:
    return ["sparse_columns", "sparse_values"]
  return ["residuals"]


def make_store(residuals: np.ndarray, residual_format: str, top_m: int | None = None):
  """A store of ``residual_format`` from dense rows ``[n, C]`` (``top_m``: sparse only)."""
  if residual_format in SPARSE_FORMATS:
    if top_m is None:
      raise ValueError(f"top_m is required for the {residual_format} residual format")
    return SparseStore.from_dense(residuals, top_m, residual_format)
  return DenseStore.from_dense(residuals, residual_format)


def store_from_arrays(arrays: dict, residual_format: str, num_outputs: int, top_m: int | None = None):
  """A store from its arrays: ``{"residuals": [n, C]}`` (float32, or bfloat16 as uint16 bits) or
  ``{"sparse_columns", "sparse_values"}`` ``[n, min(top_m, C - 1) + 1]`` (integer ids, float32
  values), as :meth:`arrays` returns them and as the inference pass computes them."""
  if residual_format not in FORMATS:
    raise ValueError(f"residual_format must be one of {list(FORMATS)}, got {residual_format!r}")
  names = array_names(residual_format)
  missing = [name for name in names if name not in arrays]
  if missing:
    raise ValueError(f"{residual_format} residual arrays need {names}, missing {missing}")
  if residual_format in SPARSE_FORMATS:
    return SparseStore.from_arrays(arrays, num_outputs, top_m, residual_format)
  return DenseStore.from_arrays(arrays, residual_format, num_outputs)
