"""The soft-kNN math against NumPy and scikit-learn."""
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsRegressor

import resmem_jax
from resmem_jax import resmem


def _np_weights(d, sigma):
  z = -d.astype(np.float64) / sigma
  z -= z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def test_weights_estimate_prediction_match_numpy():
  rng = np.random.default_rng(1)
  d = rng.uniform(0, 3, size=(10, 5)).astype(np.float32)
  r = rng.normal(size=(10, 5, 4)).astype(np.float32)
  base = rng.uniform(size=(10, 4)).astype(np.float32)
  w = resmem.neighbour_weights(d, 0.7)
  np.testing.assert_allclose(w, _np_weights(d, 0.7), atol=1e-6)
  want = np.einsum("qk,qkc->qc", _np_weights(d, 0.7), r)
  np.testing.assert_allclose(resmem.residual_estimate(w, r), want, atol=1e-5)
  np.testing.assert_allclose(resmem.resmem_prediction(base, w, r), base + want, atol=1e-5)


def test_small_sigma_is_nearest_neighbour():
  d = np.array([[0.3, 0.1, 0.2]], np.float32)
  w = np.asarray(resmem.neighbour_weights(d, 1e-6))
  np.testing.assert_array_equal(w, [[0.0, 1.0, 0.0]])


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_sigma(sigma):
  with pytest.raises(ValueError, match="sigma"):
    resmem.neighbour_weights(np.zeros((1, 2)), sigma)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_memory_estimate_matches_numpy_and_sklearn(backend):
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

  memory = resmem_jax.build_memory(keys, res, backend=backend)
  got_d, got_i = memory.search(queries, k)
  np.testing.assert_array_equal(got_i, order)
  np.testing.assert_allclose(got_d, nd, atol=1e-5)
  np.testing.assert_allclose(memory.residual_estimate(queries, k, sigma), want, atol=1e-5)
  base = rng.uniform(size=(40, 3)).astype(np.float32)
  np.testing.assert_allclose(memory.predict(base, queries, k, sigma), base + want, atol=1e-5)

  sk = KNeighborsRegressor(n_neighbors=k, weights=lambda d: _np_weights(d, sigma), algorithm="brute")
  sk.fit(keys, res)
  np.testing.assert_allclose(memory.residual_estimate(queries, k, sigma), sk.predict(queries), atol=1e-5)
