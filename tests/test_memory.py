"""Memory: formats, memorization, editing, bad input, multi-device exact search."""
import json

import numpy as np
import pytest
from conftest import run_python

import resmem_jax
from resmem_jax.memory import storage


def _classification_memory_data(n=300, dim=6, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(n, dim)).astype(np.float32)
  labels = rng.integers(0, classes, size=n)
  logits = rng.normal(size=(n, classes)).astype(np.float32)
  return keys, labels, logits, resmem_jax.residuals(labels, logits, 1.0)


@pytest.mark.parametrize("backend", ["exact", "scann"])
@pytest.mark.parametrize("fmt", ["dense", "bfloat16", "sparse"])
def test_memorization(backend, fmt):
  keys, labels, logits, res = _classification_memory_data()
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  memory = resmem_jax.build_memory(keys, res, backend=backend, residual_format=fmt, top_m=2)
  dist, idx = memory.search(keys, 1)
  np.testing.assert_array_equal(idx[:, 0], np.arange(len(keys)))
  np.testing.assert_array_equal(dist[:, 0], 0.0)
  pred = memory.predict(probs, keys, k=5, sigma=1e-6)
  np.testing.assert_array_equal(pred.argmax(1), labels)
  if fmt == "dense":  # sigma -> 0 gives back the exact one-hot target
    np.testing.assert_allclose(pred, np.eye(5)[labels], atol=1e-6)
  assert memory.predict(probs, keys, k=5, sigma=0.05).argmax(1).tolist() == labels.tolist()


def test_sparse_error_bound():
  rng = np.random.default_rng(3)
  classes, m = 50, 4
  logits = 2.0 * rng.normal(size=(400, classes)).astype(np.float32)
  labels = rng.integers(0, classes, size=400)
  res = resmem_jax.residuals(labels, logits, 1.0)
  keys = rng.normal(size=(400, 5)).astype(np.float32)
  memory = resmem_jax.build_memory(keys, res, residual_format="sparse", top_m=m)
  err = np.abs(memory.gather_residuals(np.arange(400)) - res)
  bound = storage.sparse_error_bound(res, m)
  probs = np.sort(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), axis=1)[:, ::-1]
  assert np.all(err.max(1) <= bound + 1e-7)
  assert np.all(bound <= probs[:, m] + 1e-7)   # dropped entries are at most p_(m+1)
  assert np.all(bound <= 1.0 / (m + 1) + 1e-7)
  assert bound.max() > 0  # the form really is lossy here
  # label column kept exactly: argmax of residual unchanged
  np.testing.assert_array_equal(memory.gather_residuals(np.arange(400)).argmax(1), labels)
  # the estimate (a convex combination) inherits the per-example bound
  dense = resmem_jax.build_memory(keys, res)
  queries = rng.normal(size=(30, 5)).astype(np.float32)
  _, idx = dense.search(queries, 8)
  diff = np.abs(memory.residual_estimate(queries, 8, 0.5) - dense.residual_estimate(queries, 8, 0.5))
  assert np.all(diff.max(1) <= bound[idx].max(1) + 1e-6)


def test_bfloat16_error_bound():
  keys, _, _, res = _classification_memory_data()
  memory = resmem_jax.build_memory(keys, res, residual_format="bfloat16")
  err = np.abs(memory.gather_residuals(np.arange(len(keys))) - res)
  assert err.max() > 0
  assert np.all(err <= 2.0 ** -8 * np.abs(res) + 1e-12)
  assert memory.bytes_per_example()["residuals"] == 2 * res.shape[1]


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_add_is_queryable_immediately(backend):
  keys, _, _, res = _classification_memory_data(n=2000)
  memory = resmem_jax.build_memory(keys, res, backend=backend)
  new_keys = keys[:5] + 0.01
  new_res = np.eye(5, dtype=np.float32)
  memory.add(new_keys, new_res)
  assert memory.size == 2005
  _, idx = memory.search(new_keys, 1)
  np.testing.assert_array_equal(idx[:, 0], np.arange(2000, 2005))
  est = memory.residual_estimate(new_keys, 1, 1.0)
  np.testing.assert_allclose(est, new_res)
  if backend == "scann":  # a large addition triggers a rebuild; search stays exact-equivalent
    more = np.random.default_rng(5).normal(size=(1500, 6)).astype(np.float32)
    memory.add(more, np.zeros((1500, 5), np.float32))
    _, idx = memory.search(more[:10], 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(2005, 2015))


def test_bad_inputs():
  keys, _, _, res = _classification_memory_data(n=50)
  build = resmem_jax.build_memory
  with pytest.raises(ValueError, match="backend must be one of \\['exact', 'scann'\\]"):
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
  memory = build(keys, res)
  with pytest.raises(ValueError, match="k must be in"):
    memory.search(keys, 0)
  with pytest.raises(ValueError, match="k must be in"):
    memory.search(keys, 51)
  with pytest.raises(ValueError, match="queries have dimension"):
    memory.search(keys[:, :3], 2)
  with pytest.raises(ValueError, match="queries contains NaN"):
    memory.search(np.full((1, 6), np.nan, np.float32), 2)
  with pytest.raises(ValueError, match="sigma"):
    memory.predict(np.zeros((50, 5), np.float32), keys, 3, 0.0)
  with pytest.raises(ValueError, match="base has 4 outputs"):
    memory.predict(np.zeros((50, 4), np.float32), keys, 3, 1.0)
  with pytest.raises(ValueError, match="keys have dimension"):
    memory.add(keys[:, :2], res)
  with pytest.raises(ValueError, match="indices must lie"):
    memory.gather_residuals(np.array([50]))
  with pytest.raises(ValueError, match="unknown scann options"):
    build(keys, res, backend="scann", block_size=3)


def test_multi_device_exact_equals_single_device():
  keys, _, _, res = _classification_memory_data(n=1003, dim=9)
  queries = np.random.default_rng(7).normal(size=(37, 9)).astype(np.float32)
  memory = resmem_jax.build_memory(keys, res, block_size=64)
  dist, idx = memory.search(queries, 11)
  est = memory.residual_estimate(queries, 11, 0.3)
  code = """
import numpy as np, jax, resmem_jax
assert jax.local_device_count() == 8, jax.devices()
rng = np.random.default_rng(0)
keys = rng.normal(size=(1003, 9)).astype(np.float32)
labels = rng.integers(0, 5, size=1003)
logits = rng.normal(size=(1003, 5)).astype(np.float32)
res = resmem_jax.residuals(labels, logits, 1.0)
queries = np.random.default_rng(7).normal(size=(37, 9)).astype(np.float32)
memory = resmem_jax.build_memory(keys, res, block_size=64)
assert memory._exact.num_shards == 8
d, i = memory.search(queries, 11)
out = np.concatenate([d, i.astype(np.float32), memory.residual_estimate(queries, 11, 0.3)], 1)
print("RESULT" + json.dumps(out.astype(float).tolist()))
"""
  out = run_python(code.replace("import numpy", "import json, numpy"), devices=8)
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
  base = np.full((20, 5), 0.2, np.float32)
  first = resmem_jax.build_memory(keys, resmem_jax.residuals(labels, logits, 1.0), backend=backend,
                                  residual_format=residual_format, top_m=2)
  swapped = first.with_residuals(resmem_jax.residuals(labels, logits, 3.0))
  rebuilt = resmem_jax.build_memory(keys, resmem_jax.residuals(labels, logits, 3.0), backend=backend,
                                    residual_format=residual_format, top_m=2)
  np.testing.assert_allclose(swapped.predict(base, queries, 4, 0.5),
                             rebuilt.predict(base, queries, 4, 0.5), rtol=1e-6, atol=1e-6)
  if backend == "scann":
    assert swapped._scann is first._scann  # no index rebuild
  # chunks in row order give the same memory; the original keeps its values
  chunked = first.with_residuals(np.array_split(resmem_jax.residuals(labels, logits, 3.0), 3))
  np.testing.assert_allclose(chunked.gather_residuals(np.arange(300)),
                             swapped.gather_residuals(np.arange(300)), atol=1e-7)
  assert not np.allclose(first.gather_residuals(np.arange(10)), swapped.gather_residuals(np.arange(10)))
  with pytest.raises(ValueError, match="rows"):
    first.with_residuals(np.zeros((299, 5), np.float32))
  with pytest.raises(ValueError, match="outputs"):
    first.with_residuals(np.zeros((300, 4), np.float32))
