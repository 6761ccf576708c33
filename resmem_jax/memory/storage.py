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
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

FORMATS = ("dense", "bfloat16", "sparse")


def sparse_error_bound(residuals: np.ndarray, top_m: int) -> np.ndarray:
  """Per-example max-entry error of the sparse form: the largest dropped ``|r_j|``."""
  residuals = np.asarray(residuals, np.float32)
  kept = _sparse_columns(residuals, top_m)
  mask = np.ones(residuals.shape, bool)
  np.put_along_axis(mask, kept, False, axis=1)
  return np.max(np.where(mask, np.abs(residuals), 0.0), axis=1, initial=0.0)


def _sparse_columns(residuals: np.ndarray, top_m: int) -> np.ndarray:
  """Column ids [n, m+1]: argmax (the true label), then the m most negative entries."""
  num_classes = residuals.shape[1]
  label = np.argmax(residuals, axis=1)[:, None]
  # The m most negative residuals other than the label column.
  scores = residuals.copy()
  np.put_along_axis(scores, label, np.inf, axis=1)
  m = min(top_m, num_classes - 1)
  if m == 0:
    return label
  smallest = np.argpartition(scores, m - 1, axis=1)[:, :m]
  return np.concatenate([label, smallest], axis=1)


class DenseStore:
  """float32 (``dense``) or bfloat16 (``bfloat16``) rows."""

  def __init__(self, values: np.ndarray, residual_format: str):
    self.format = residual_format
    self.dtype = np.float32 if residual_format == "dense" else jnp.bfloat16
    self.values = np.asarray(values).astype(self.dtype)

  @property
  def num_outputs(self) -> int:
    return self.values.shape[1]

  def __len__(self) -> int:
    return self.values.shape[0]

  def append(self, residuals: np.ndarray) -> None:
    self.values = np.concatenate([self.values, residuals.astype(self.dtype)])

  def gather(self, indices: np.ndarray) -> np.ndarray:
    return self.values[indices].astype(np.float32)

  def bytes_per_example(self) -> float:
    return float(self.values.itemsize * self.num_outputs)

  def arrays(self) -> dict:
    # numpy cannot write bfloat16 natively: keep its bit pattern as uint16.
    if self.format == "bfloat16":
      return {"residuals": self.values.view(np.uint16)}
    return {"residuals": self.values}

  @classmethod
  def from_arrays(cls, arrays: dict, residual_format: str, num_outputs: int, top_m):
    values = arrays["residuals"]
    if residual_format == "bfloat16":
      if values.dtype != np.uint16:
        raise ValueError(f"residuals file has dtype {values.dtype}, expected uint16 bfloat16 bits")
      values = values.view(jnp.bfloat16)
    elif values.dtype != np.float32:
      raise ValueError(f"residuals file has dtype {values.dtype}, expected float32")
    if values.ndim != 2 or values.shape[1] != num_outputs:
      raise ValueError(f"residuals file has shape {values.shape}, expected [n, {num_outputs}]")
    store = cls.__new__(cls)
    store.format = residual_format
    store.dtype = values.dtype
    store.values = values
    return store


class SparseStore:
  """``m + 1`` (class id, value) pairs per example; everything else is zero."""

  format = "sparse"

  def __init__(self, residuals: np.ndarray, top_m: int):
    self.top_m = int(top_m)
    self._num_outputs = residuals.shape[1]
    self.id_dtype = np.uint16 if self._num_outputs <= 65536 else np.int32
    self.columns = np.zeros((0, min(self.top_m, self._num_outputs - 1) + 1), self.id_dtype)
    self.values = np.zeros((0, self.columns.shape[1]), np.float32)
    self.append(residuals)

  @property
  def num_outputs(self) -> int:
    return self._num_outputs

  def __len__(self) -> int:
    return self.values.shape[0]

  def append(self, residuals: np.ndarray) -> None:
    residuals = np.asarray(residuals, np.float32)
    columns = _sparse_columns(residuals, self.top_m)
    values = np.take_along_axis(residuals, columns, axis=1)
    self.columns = np.concatenate([self.columns, columns.astype(self.id_dtype)])
    self.values = np.concatenate([self.values, values])

  def gather(self, indices: np.ndarray) -> np.ndarray:
    columns = self.columns[indices].astype(np.int64)
    values = self.values[indices]
    dense = np.zeros(indices.shape + (self._num_outputs,), np.float32)
    np.put_along_axis(dense, columns, values, axis=-1)
    return dense

  def weighted_sum(self, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``sum_i w_i r_i`` without densifying every neighbour: [q, k] weights -> [q, C]."""
    columns = self.columns[indices].astype(np.int64)        # [q, k, m+1]
    contrib = self.values[indices] * weights[..., None]      # [q, k, m+1]
    out = np.zeros((indices.shape[0], self._num_outputs), np.float32)
    rows = np.broadcast_to(np.arange(indices.shape[0])[:, None, None], columns.shape)
    np.add.at(out, (rows.ravel(), columns.ravel()), contrib.ravel())
    return out

  def bytes_per_example(self) -> float:
    return float(self.columns.shape[1] * (self.columns.itemsize + self.values.itemsize))

  def arrays(self) -> dict:
    return {"sparse_columns": self.columns, "sparse_values": self.values}

  @classmethod
  def from_arrays(cls, arrays: dict, residual_format: str, num_outputs: int, top_m):
    columns, values = arrays["sparse_columns"], arrays["sparse_values"]
    width = min(int(top_m), num_outputs - 1) + 1
    if columns.shape != values.shape or columns.ndim != 2 or columns.shape[1] != width:
      raise ValueError(f"sparse residual files have shapes {columns.shape}, {values.shape}; "
                       f"expected [n, {width}] each")
    if values.dtype != np.float32 or not np.issubdtype(columns.dtype, np.integer):
      raise ValueError(f"sparse residual files have dtypes {columns.dtype}, {values.dtype}")
    if columns.size and int(columns.max()) >= num_outputs:
      raise ValueError(f"sparse residual class ids reach {int(columns.max())} >= {num_outputs}")
    store = cls.__new__(cls)
    store.top_m = int(top_m)
    store._num_outputs = num_outputs
    store.id_dtype = columns.dtype
    store.columns = columns
    store.values = values
    return store


def make_store(residuals: np.ndarray, residual_format: str, top_m):
  if residual_format == "sparse":
    return SparseStore(residuals, top_m)
  return DenseStore(residuals, residual_format)


def store_from_arrays(arrays: dict, residual_format: str, num_outputs: int, top_m):
  cls = SparseStore if residual_format == "sparse" else DenseStore
  return cls.from_arrays(arrays, residual_format, num_outputs, top_m)
