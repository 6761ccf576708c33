"""Residual stores: the sparse selection, stores from arrays (the engine's path), memory_from_store."""
import numpy as np
import pytest

from resmem_jax.core import residuals as residuals_lib
from resmem_jax.memory import build_memory, memory_from_store
from resmem_jax.memory import store as store_lib


def _residuals(n=50, classes=9, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  return labels, residuals_lib.residuals(labels, 2.0 * rng.normal(size=(n, classes)), 1.0)


def test_sparse_keeps_the_label_and_the_m_most_negative_entries(monkeypatch):
  labels, res = _residuals()
  m = 3
  # several selection chunks, so chunking cannot change the result
  monkeypatch.setattr(store_lib, "SPARSE_CHUNK_ELEMENTS", 9 * 7)
  store = store_lib.make_store(res, "sparse", m)
  values, columns = store.rows(np.arange(len(res)))
  assert columns.shape == (50, m + 1) and store.columns.dtype == np.uint16
  np.testing.assert_array_equal(columns[:, 0], labels)
  for row, cols in zip(res, columns):
    others = np.delete(np.arange(9), np.argmax(row))
    want = others[np.argsort(row[others], kind="stable")[:m]]
    assert set(cols[1:]) == set(want)
  np.testing.assert_array_equal(values, np.take_along_axis(res, columns, axis=1))
  # m >= C - 1 keeps every entry: lossless
  full = store_lib.make_store(res, "sparse", 20)
  np.testing.assert_allclose(full.gather(np.arange(50)), res, atol=0)


@pytest.mark.parametrize("fmt", ["dense", "bfloat16", "sparse"])
def test_store_from_arrays_equals_the_store_from_dense_rows(fmt):
  labels, res = _residuals()
  built = store_lib.make_store(res, fmt, 4)
  # what the inference pass hands over: int32 ids from sparse_top_m / bfloat16 as uint16 bits
  if fmt == "sparse":
    columns, values = residuals_lib.sparse_top_m(res, 4, labels)
    arrays = {"sparse_columns": np.asarray(columns), "sparse_values": np.asarray(values)}
  else:
    arrays = built.arrays()
  store = store_lib.store_from_arrays(arrays, fmt, 9, 4)
  assert (store.format, len(store), store.num_outputs) == (fmt, 50, 9)
  assert store.bytes_per_example() == built.bytes_per_example()
  np.testing.assert_array_equal(store.gather(np.arange(50)), built.gather(np.arange(50)))
  store.append(res[:2])
  np.testing.assert_array_equal(store.gather(np.arange(50, 52)), built.gather(np.arange(2)))


def test_store_from_arrays_rejects_bad_arrays():
  _, res = _residuals()
  columns = np.zeros((50, 5), np.int32)
  values = np.zeros((50, 5), np.float32)
  cases = [
      (({"residuals": res}, "int8", 9, None), "residual_format must be one of"),
      (({"sparse_values": values}, "sparse", 9, 4), r"missing \['sparse_columns'\]"),
      (({"residuals": res.astype(np.float64)}, "dense", 9, None), "dtype float64, expected float32"),
      (({"residuals": res}, "bfloat16", 9, None), "expected uint16 bfloat16 bits"),
      (({"residuals": res}, "dense", 8, None), r"shape \(50, 9\), expected \[n, 8\]"),
      (({"sparse_columns": columns, "sparse_values": values}, "sparse", 9, 3), r"expected \[n, 4\]"),
      (({"sparse_columns": columns + 9, "sparse_values": values}, "sparse", 9, 4), r"outside \[0, 9\)"),
      (({"sparse_columns": columns - 1, "sparse_values": values}, "sparse", 9, 4), r"outside \[0, 9\)"),
      (({"sparse_columns": values, "sparse_values": values}, "sparse", 9, 4), "dtypes"),
      (({"sparse_columns": columns, "sparse_values": values}, "sparse", 9, None), "top_m"),
  ]
  for args, message in cases:
    with pytest.raises(ValueError, match=message):
      store_lib.store_from_arrays(*args)


def test_memory_from_store_matches_build_memory():
  labels, res = _residuals(n=120)
  keys = np.random.default_rng(3).normal(size=(120, 4)).astype(np.float32)
  store = store_lib.store_from_arrays(store_lib.make_store(res, "bfloat16").arrays(), "bfloat16", 9)
  memory = memory_from_store(keys, store, "scann", labels=labels, metadata={"T": 2.0}, reorder=0)
  built = build_memory(keys, res, "scann", "bfloat16", labels=labels, reorder=0)
  queries = keys[:7] + 0.1
  for a, b in zip(memory.search(queries, 3), built.search(queries, 3)):
    np.testing.assert_array_equal(a, b)
  ids = memory.search(queries, 3)[1]
  np.testing.assert_array_equal(memory.residual_rows(ids)[0], built.residual_rows(ids)[0])
  assert memory.metadata == {"T": 2.0} and memory.labels.tolist() == labels.tolist()
  # adding to the memory does not change the caller's store
  memory.add(keys[:1], res[:1], labels=labels[:1])
  assert len(store) == 120 and memory.size == 121
  with pytest.raises(ValueError, match="rows but the memory has"):
    memory_from_store(keys[:10], store)
  with pytest.raises(ValueError, match="must be a residual store"):
    memory_from_store(keys, res)
  with pytest.raises(ValueError, match="rows but the memory has 121 keys"):
    memory.with_store(store)
  with pytest.raises(ValueError, match="store has 4 outputs but the memory has 9"):
    built.with_store(store_lib.make_store(np.zeros((120, 4), np.float32), "dense"))
