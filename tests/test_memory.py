"""Memory: search against NumPy / scikit-learn, formats, memorization, editing, labels, bad input,
multi-device exact search."""
import json

import numpy as np
import pytest
from conftest import run_python
from sklearn.neighbors import KNeighborsRegressor

from resmem_jax.core import predictor
from resmem_jax.core.residuals import residuals as make_residuals
from resmem_jax.memory import build_memory


def _classification_memory_data(n=300, dim=6, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(n, dim)).astype(np.float32)
  labels = rng.integers(0, classes, size=n)
  logits = rng.normal(size=(n, classes)).astype(np.float32)
  return keys, labels, logits, make_residuals(labels, logits, 1.0)


def _estimate(memory, queries, k, sigma):
  """``sum_i softmax(-d_i / sigma) r_i`` from the memory's neighbours and rows (core math)."""
  distances, ids = memory.search(queries, k)
  values, columns = memory.residual_rows(ids)
  weights = predictor.neighbour_weights(distances, predictor.check_sigma(sigma))
  return np.asarray(predictor.residual_estimate(weights, values, columns, memory.num_outputs))


def _np_weights(d, sigma):
  z = -d.astype(np.float64) / sigma
  z -= z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_search_and_estimate_match_numpy_and_sklearn(backend):
  rng = np.random.default_rng(2)
  keys = rng.normal(size=(500, 8)).astype(np.float32)
  res = rng.normal(size=(500, 3)).astype(np.float32)
  queries = rng.normal(size=(40, 8)).astype(np.float32)
  k, sigma = 7, 0.4
  # NumPy reference: full distance matrix, stable sort, softmax weights.
  dist = np.sqrt(((queries[:, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1))
  order = np.argsort(dist, axis=1, kind="stable")[:, :k]
  nd = np.take_along_axis(dist, order, axis=1)
  want = np.einsum("qk,qkc->qc", _np_weights(nd, sigma), res[order])

  memory = build_memory(keys, res, backend=backend)
  got_d, got_i = memory.search(queries, k)
  np.testing.assert_array_equal(got_i, order)
  np.testing.assert_allclose(got_d, nd, atol=1e-5)
  assert got_d.dtype == np.float32 and got_i.dtype == np.int32
  np.testing.assert_allclose(_estimate(memory, queries, k, sigma), want, atol=1e-5)

  sk = KNeighborsRegressor(n_neighbors=k, weights=lambda d: _np_weights(d, sigma), algorithm="brute")
  sk.fit(keys, res)
  np.testing.assert_allclose(_estimate(memory, queries, k, sigma), sk.predict(queries), atol=1e-5)


@pytest.mark.parametrize("options", [
    {},  # this platform's defaults (CPU: tiles of 128 queries, 2 calls in flight)
    {"block_size": 192, "query_chunk": 16, "query_tile": 4, "calls_in_flight": 3},  # many blocks
    {"block_size": 1000, "query_chunk": 70, "query_tile": 70, "calls_in_flight": 1},
    {"block_size": 7, "query_chunk": 5, "query_tile": 2, "calls_in_flight": 2},  # tiny blocks
])
def test_exact_settings_do_not_change_results(options):
  """Blocks, query chunks and tiles, and calls in flight only change how the work is cut: the
  neighbours are NumPy's, exact ties (duplicated keys) going to the lower id."""
  rng = np.random.default_rng(5)
  keys = rng.integers(-2, 3, size=(1100, 6)).astype(np.float32)  # many duplicate keys
  queries = rng.integers(-2, 3, size=(70, 6)).astype(np.float32)
  dist = np.sqrt(((queries[:, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1))
  order = np.argsort(dist, axis=1, kind="stable")[:, :12]
  memory = build_memory(keys, np.zeros((1100, 1), np.float32), **options)
  got_d, got_i = memory.search(queries, 12)
  np.testing.assert_array_equal(got_i, order)
  np.testing.assert_allclose(got_d, np.take_along_axis(dist, order, axis=1), atol=1e-6)
  assert memory.backend_options == options  # only the options given are recorded


@pytest.mark.parametrize("backend", ["exact", "scann"])
@pytest.mark.parametrize("fmt", ["dense", "bfloat16", "sparse"])
def test_memorization(backend, fmt):
  keys, labels, logits, res = _classification_memory_data()
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  memory = build_memory(keys, res, backend=backend, residual_format=fmt, top_m=2)
  dist, idx = memory.search(keys, 1)
  np.testing.assert_array_equal(idx[:, 0], np.arange(len(keys)))
  np.testing.assert_array_equal(dist[:, 0], 0.0)
  pred = probs + _estimate(memory, keys, 5, 1e-6)
  np.testing.assert_array_equal(pred.argmax(1), labels)
  if fmt == "dense":  # sigma -> 0 gives back the exact one-hot target
    np.testing.assert_allclose(pred, np.eye(5)[labels], atol=1e-6)
  assert (probs + _estimate(memory, keys, 5, 0.05)).argmax(1).tolist() == labels.tolist()


def test_residual_rows_per_format():
  keys, _, _, res = _classification_memory_data(n=40, classes=7)
  ids = np.array([[3, 1], [0, 39]])
  values, columns = build_memory(keys, res).residual_rows(ids)
  assert columns is None and values.dtype == np.float32
  np.testing.assert_array_equal(values, res[ids])
  sparse = build_memory(keys, res, residual_format="sparse", top_m=3)
  values, columns = sparse.residual_rows(ids)
  assert values.shape == columns.shape == (2, 2, 4) and columns.dtype == np.int32
  np.testing.assert_array_equal(values, np.take_along_axis(res[ids], columns, axis=-1))
  np.testing.assert_array_equal(columns[..., 0], res[ids].argmax(-1))  # the label first
  # the estimate from sparse rows equals the one from the densified rows
  weights = np.full((2, 2), 0.5, np.float32)
  np.testing.assert_allclose(
      predictor.residual_estimate(weights, values, columns, 7),
      predictor.residual_estimate(weights, sparse.gather_residuals(ids)), atol=1e-7)


def test_sparse_error_bound():
  rng = np.random.default_rng(3)
  classes, m = 50, 4
  logits = 2.0 * rng.normal(size=(400, classes)).astype(np.float32)
  labels = rng.integers(0, classes, size=400)
  res = make_residuals(labels, logits, 1.0)
  keys = rng.normal(size=(400, 5)).astype(np.float32)
  memory = build_memory(keys, res, residual_format="sparse", top_m=m)
  err = np.abs(memory.gather_residuals(np.arange(400)) - res).max(1)
  probs = np.sort(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), axis=1)[:, ::-1]
  assert np.all(err <= probs[:, m] + 1e-7)   # dropped entries are at most p_(m+1)
  assert np.all(err <= 1.0 / (m + 1) + 1e-7)
  assert err.max() > 0  # the form really is lossy here
  assert memory.bytes_per_example()["residuals"] == (m + 1) * (2 + 4)
  # label column kept exactly: argmax of residual unchanged
  np.testing.assert_array_equal(memory.gather_residuals(np.arange(400)).argmax(1), labels)
  # the estimate (a convex combination) inherits the per-example bound
  dense = build_memory(keys, res)
  queries = rng.normal(size=(30, 5)).astype(np.float32)
  _, idx = dense.search(queries, 8)
  diff = np.abs(_estimate(memory, queries, 8, 0.5) - _estimate(dense, queries, 8, 0.5))
  assert np.all(diff.max(1) <= err[idx].max(1) + 1e-6)


def test_bfloat16_error_bound():
  keys, _, _, res = _classification_memory_data()
  memory = build_memory(keys, res, residual_format="bfloat16")
  err = np.abs(memory.gather_residuals(np.arange(len(keys))) - res)
  assert err.max() > 0
  assert np.all(err <= 2.0 ** -8 * np.abs(res) + 1e-12)
  assert memory.bytes_per_example()["residuals"] == 2 * res.shape[1]


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_add_is_queryable_immediately(backend):
  keys, _, _, res = _classification_memory_data(n=2000)
  memory = build_memory(keys, res, backend=backend)
  new_keys = keys[:5] + 0.01
  new_res = np.eye(5, dtype=np.float32)
  before = memory.index
  memory.add(new_keys, new_res)
  assert memory.size == 2005 and memory.index.size == 2005
  assert before.size == 2000  # add builds a new index; the old one is untouched
  _, idx = memory.search(new_keys, 1)
  np.testing.assert_array_equal(idx[:, 0], np.arange(2000, 2005))
  np.testing.assert_allclose(_estimate(memory, new_keys, 1, 1.0), new_res)
  if backend == "scann":  # a small addition goes to the exact side buffer ...
    assert memory.index.indexed == 2000 and memory.index.searcher is before.searcher
    # ... a large one triggers a rebuild; search stays exact-equivalent
    more = np.random.default_rng(5).normal(size=(1500, 6)).astype(np.float32)
    memory.add(more, np.zeros((1500, 5), np.float32))
    assert memory.index.indexed == 3505 and memory.index.buffer is None
    _, idx = memory.search(more[:10], 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(2005, 2015))


def test_side_buffer_merges_with_scann_results():
  keys, _, _, res = _classification_memory_data(n=1200, dim=4)
  rng = np.random.default_rng(9)
  memory = build_memory(keys, res, backend="scann")
  exact = build_memory(keys, res)
  for _ in range(3):  # several small additions, each kept in the buffer
    extra = rng.normal(size=(40, 4)).astype(np.float32)
    memory.add(extra, np.zeros((40, 5), np.float32))
    exact.add(extra, np.zeros((40, 5), np.float32))
  assert memory.index.indexed == 1200 and memory.index.buffer.size == 120
  queries = rng.normal(size=(50, 4)).astype(np.float32)
  for a, b in zip(memory.search(queries, 6), exact.search(queries, 6)):
    np.testing.assert_array_equal(a, b)


def test_labels_are_kept_checked_and_extended():
  keys, labels, _, res = _classification_memory_data(n=60)
  memory = build_memory(keys, res, labels=labels)
  assert memory.labels.dtype == np.int32
  np.testing.assert_array_equal(memory.labels, labels)
  memory.add(keys[:2] + 0.5, res[:2], labels=np.array([4, 0]))
  np.testing.assert_array_equal(memory.labels[-2:], [4, 0])
  _, ids = memory.search(keys[:3], 1)
  np.testing.assert_array_equal(memory.labels[ids[:, 0]], labels[:3])
  assert memory.with_residuals(np.vstack([res, res[:2]])).labels is memory.labels
  with pytest.raises(ValueError, match="stores labels"):
    memory.add(keys[:1], res[:1])
  with pytest.raises(ValueError, match="no labels"):
    build_memory(keys, res).add(keys[:1], res[:1], labels=[1])
  with pytest.raises(ValueError, match="labels has 59 entries"):
    build_memory(keys, res, labels=labels[:59])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
    build_memory(keys, res, labels=np.full(60, 5))
  with pytest.raises(ValueError, match="labels must be a 1-D integer"):
    build_memory(keys, res, labels=labels.astype(np.float32))
  assert build_memory(keys, res).labels is None


def test_bad_inputs():
  keys, _, _, res = _classification_memory_data(n=50)
  build = build_memory
  with pytest.raises(ValueError, match="backend must be one of \\['exact', 'scann', 'approx'\\]"):
    build(keys, res, backend="annoy")
  with pytest.raises(ValueError, match="residual_format"):
    build(keys, res, residual_format="int8")
  with pytest.raises(ValueError, match="keys contains NaN"):
    build(np.where(keys > 1, np.nan, keys), res)
  with pytest.raises(ValueError, match="residuals contains NaN"):
    build(keys, np.where(res > 0.5, np.inf, res))
  with pytest.raises(ValueError, match="rows"):
    build(keys[:10], res)
  with pytest.raises(ValueError, match="keys must be a floating"):
    build(keys.astype(np.int32), res)
  with pytest.raises(ValueError, match="keys is empty"):
    build(keys[:0], res[:0])
  with pytest.raises(ValueError, match="top_m"):
    build(keys, res, residual_format="sparse", top_m=0)
  with pytest.raises(ValueError, match="unknown exact backend options"):
    build(keys, res, leaves=3)
  with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
    build(keys, res, block_size=0)
  memory = build(keys, res)
  with pytest.raises(ValueError, match="k must be in"):
    memory.search(keys, 0)
  with pytest.raises(ValueError, match="k must be in"):
    memory.search(keys, 51)
  with pytest.raises(ValueError, match="queries have dimension"):
    memory.search(keys[:, :3], 2)
  with pytest.raises(ValueError, match="queries contains NaN"):
    memory.search(np.full((1, 6), np.nan, np.float32), 2)
  with pytest.raises(ValueError, match="keys have dimension"):
    memory.add(keys[:, :2], res)
  with pytest.raises(ValueError, match="indices must lie"):
    memory.gather_residuals(np.array([50]))
  with pytest.raises(ValueError, match="indices must lie"):
    memory.residual_rows(np.array([[-1]]))
  with pytest.raises(ValueError, match="unknown scann backend options"):
    build(keys, res, backend="scann", block_size=3)
  # Metadata is saved as JSON: NumPy scalars and tuples convert, other objects are refused
  # rather than saved as their str.
  assert build(keys, res, metadata={"step": np.int64(3), "T": np.float32(0.5), "ks": (1, 2)}
               ).metadata == {"step": 3, "T": 0.5, "ks": [1, 2]}
  with pytest.raises(ValueError, match="metadata must be JSON-serialisable: object <object"):
    build(keys, res, metadata={"x": object()})
  with pytest.raises(ValueError, match="metadata must be a dict, got list"):
    build(keys, res, metadata=[1])


def test_multi_device_exact_equals_single_device():
  keys, _, _, res = _classification_memory_data(n=1003, dim=9)
  queries = np.random.default_rng(7).normal(size=(37, 9)).astype(np.float32)
  memory = build_memory(keys, res, block_size=64)
  dist, idx = memory.search(queries, 11)
  est = _estimate(memory, queries, 11, 0.3)
  code = """
import json, numpy as np, jax
from resmem_jax.core import predictor
from resmem_jax.core.residuals import residuals
from resmem_jax.memory import build_memory
from resmem_jax.memory.exact import ExactIndex
from resmem_jax.memory.keys import KeyStore
assert jax.local_device_count() == 8, jax.devices()
rng = np.random.default_rng(0)
keys = rng.normal(size=(1003, 9)).astype(np.float32)
labels = rng.integers(0, 5, size=1003)
logits = rng.normal(size=(1003, 5)).astype(np.float32)
res = residuals(labels, logits, 1.0)
queries = np.random.default_rng(7).normal(size=(37, 9)).astype(np.float32)
memory = build_memory(keys, res, block_size=64)
assert memory.index.num_shards == 8 and ExactIndex.build(KeyStore('float32', keys), {}).num_shards == 8
d, i = memory.search(queries, 11)
values, _ = memory.residual_rows(i)
est = np.asarray(predictor.residual_estimate(predictor.neighbour_weights(d, 0.3), values))
out = np.concatenate([d, i.astype(np.float32), est], 1)
print("RESULT" + json.dumps(out.astype(float).tolist()))
"""
  out = run_python(code, devices=8)
  got = np.array(json.loads(out.stdout.split("RESULT")[-1]), np.float32)
  np.testing.assert_array_equal(got[:, 11:22].astype(np.int32), idx)
  np.testing.assert_allclose(got[:, :11], dist, atol=1e-6)
  np.testing.assert_allclose(got[:, 22:], est, atol=1e-6)


@pytest.mark.parametrize("backend", ["exact", "scann"])
@pytest.mark.parametrize("residual_format", ["dense", "sparse"])
def test_with_residuals_shares_the_index_and_swaps_values(backend, residual_format):
  rng = np.random.default_rng(7)
  keys = rng.normal(size=(300, 6)).astype(np.float32)
  labels = rng.integers(0, 5, 300)
  logits = rng.normal(size=(300, 5)).astype(np.float32)
  queries = rng.normal(size=(20, 6)).astype(np.float32)
  first = build_memory(keys, make_residuals(labels, logits, 1.0), backend=backend,
                       residual_format=residual_format, top_m=2, metadata={"T": 1})
  swapped = first.with_residuals(make_residuals(labels, logits, 3.0))
  rebuilt = build_memory(keys, make_residuals(labels, logits, 3.0), backend=backend,
                         residual_format=residual_format, top_m=2)
  np.testing.assert_allclose(_estimate(swapped, queries, 4, 0.5), _estimate(rebuilt, queries, 4, 0.5),
                             rtol=1e-6, atol=1e-6)
  assert swapped.index is first.index  # no index rebuild
  assert swapped.metadata == {"T": 1}
  assert first.with_residuals(make_residuals(labels, logits, 3.0), metadata={"T": 3}).metadata == {"T": 3}
  # chunks in row order give the same memory; the original keeps its values
  chunked = first.with_residuals(np.array_split(make_residuals(labels, logits, 3.0), 3))
  np.testing.assert_allclose(chunked.gather_residuals(np.arange(300)),
                             swapped.gather_residuals(np.arange(300)), atol=1e-7)
  assert not np.allclose(first.gather_residuals(np.arange(10)), swapped.gather_residuals(np.arange(10)))
  # editing the clone leaves the original (and their shared index) as they were
  swapped.add(keys[:1] + 3.0, np.zeros((1, 5), np.float32))
  assert (swapped.size, first.size, first.index.size) == (301, 300, 300)
  with pytest.raises(ValueError, match="rows"):
    first.with_residuals(np.zeros((299, 5), np.float32))
  with pytest.raises(ValueError, match="outputs"):
    first.with_residuals(np.zeros((300, 4), np.float32))
  with pytest.raises(ValueError, match="0 rows"):
    first.with_residuals([])


def test_degenerate_shapes_are_refused_in_one_line():
  rng = np.random.default_rng(11)
  keys = rng.normal(size=(10, 4)).astype(np.float32)
  residuals = rng.normal(size=(10, 3)).astype(np.float32)
  with pytest.raises(ValueError, match=r"keys has 0 columns \(shape \(10, 0\)\); give at least "
                                       r"one dimension"):
    build_memory(np.zeros((10, 0), np.float32), residuals)
  for residual_format in ("dense", "sparse"):
    with pytest.raises(ValueError, match=r"residuals has 0 columns \(shape \(10, 0\)\); give at "
                                         r"least one output"):
      build_memory(keys, residuals[:, :0], residual_format=residual_format)
  memory = build_memory(keys, residuals)
  with pytest.raises(ValueError, match="residuals has 0 columns"):
    memory.add(keys[:2], residuals[:2, :0])
