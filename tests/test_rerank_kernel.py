"""The compiled re-rank (numba) against NumPy's: the same neighbours in every key format, the same
float64 recomputation at extreme magnitudes, safe from two threads, and NumPy without numba."""
import threading

import numpy as np
import pytest

from resmem_jax.memory import exact, rerank_kernel
from resmem_jax.memory.keys import KeyStore

needs_numba = pytest.mark.skipif(not rerank_kernel.AVAILABLE, reason="numba is not installed")


def _case(n=3000, d=24, queries=70, width=60, seed=0):
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(n, d)).astype(np.float32)
  keys[1] = keys[0]  # an exact tie: the lower id goes first
  q = rng.normal(size=(queries, d)).astype(np.float32)
  q[0] = keys[0]
  candidates = rng.integers(0, n, size=(queries, width)).astype(np.int32)
  candidates[0, :2] = [1, 0]
  candidates[1, :3] = [-1, n, n + 5]  # no candidate / ids outside the keys
  return keys, q, candidates


@needs_numba
@pytest.mark.parametrize("key_format", ["array", "float32", "bfloat16", "float16", "int8"])
def test_compiled_rerank_finds_what_numpy_finds(key_format, monkeypatch):
  keys, queries, candidates = _case()
  store = keys if key_format == "array" else KeyStore.from_float32(keys, key_format)
  # Blocks of 16 queries for the kernel and chunks of 5 for the selection: every boundary is hit.
  monkeypatch.setattr(exact, "KERNEL_QUERIES", 16)
  slow = exact.rerank_exact(queries, store, candidates, 10, chunk=5, compiled=False)
  fast = exact.rerank_exact(queries, store, candidates, 10, chunk=5, compiled=True)
  np.testing.assert_array_equal(fast[1], slow[1])
  # Float32 rounding of the sums (the kernel decodes with fused multiply-adds): relative to the
  # distances' scale (about 7 here), not to a near-zero distance.
  np.testing.assert_allclose(fast[0], slow[0], rtol=1e-6, atol=1e-6)
  assert list(fast[1][0, :2]) == [0, 1]  # the tie, lower id first
  if key_format in ("array", "float32"):
    assert fast[0][0, 0] == 0.0  # a query equal to a key: distance exactly 0
  assert np.all(fast[1][1] >= 0)  # -1 and out-of-range candidates never win


@needs_numba
@pytest.mark.parametrize("magnitude", [1e-30, 1e25])
def test_compiled_rerank_recomputes_out_of_range_sums_in_float64(magnitude):
  keys, queries, candidates = _case(n=500, d=8, queries=20, width=30)
  keys, queries = keys * np.float32(magnitude), queries * np.float32(magnitude)
  slow = exact.rerank_exact(queries, keys, candidates, 5, compiled=False)
  fast = exact.rerank_exact(queries, keys, candidates, 5, compiled=True)
  assert np.all(np.isfinite(fast[0])) and np.all(fast[0][1:] > 0)
  np.testing.assert_array_equal(fast[1], slow[1])
  np.testing.assert_allclose(fast[0], slow[0], rtol=1e-6)


@needs_numba
def test_compiled_rerank_from_two_threads_at_once():
  keys, queries, candidates = _case(n=20000, queries=400, width=200)
  store = KeyStore.from_float32(keys, "int8")
  expected = exact.rerank_exact(queries, store, candidates, 10, compiled=False)
  results = [None, None]

  def search(slot):
    results[slot] = exact.rerank_exact(queries, store, candidates, 10, compiled=True)

  threads = [threading.Thread(target=search, args=(slot,)) for slot in (0, 1)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=120)
  for result in results:
    assert result is not None
    np.testing.assert_array_equal(result[1], expected[1])


def test_without_numba_the_rerank_is_numpy_and_asking_for_compiled_says_so(monkeypatch):
  keys, queries, candidates = _case(n=500, d=8, queries=10, width=20)
  expected = exact.rerank_exact(queries, keys, candidates, 5, compiled=False)
  monkeypatch.setattr(rerank_kernel, "AVAILABLE", False)

  def not_called(*args, **kwargs):
    raise AssertionError("the kernel ran without numba")

  monkeypatch.setattr(rerank_kernel, "squared_distances", not_called)
  found = exact.rerank_exact(queries, keys, candidates, 5)
  np.testing.assert_array_equal(found[1], expected[1])
  with pytest.raises(ValueError, match=r"needs numba: pip install 'resmem_jax\[fast\]'"):
    exact.rerank_exact(queries, keys, candidates, 5, compiled=True)
