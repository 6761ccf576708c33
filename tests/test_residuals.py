"""Residuals against a plain NumPy reference, and their input checks."""
import numpy as np
import pytest

import resmem_jax


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_classification_residuals_match_numpy(temperature):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=64)
  got = resmem_jax.residuals(labels, logits, temperature)
  want = np.eye(7)[labels] - _softmax(logits.astype(np.float64) / temperature)
  assert got.dtype == np.float32 and got.shape == (64, 7)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got.sum(axis=1), 0.0, atol=1e-5)  # onehot and p both sum to one


def test_regression_residuals():
  y = np.array([1.0, 2.0, -3.0])
  f = np.array([0.5, 2.5, -1.0])
  got = resmem_jax.regression_residuals(y, f)
  np.testing.assert_allclose(got, [[0.5], [-0.5], [-2.0]])
  assert got.dtype == np.float32


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), "hot"])
def test_bad_temperature(temperature):
  with pytest.raises(ValueError, match="temperature"):
    resmem_jax.residuals(np.zeros(2, int), np.zeros((2, 3), np.float32), temperature)


def test_bad_inputs():
  logits = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match="labels"):
    resmem_jax.residuals(np.zeros(2, int), logits, 1.0)
  with pytest.raises(ValueError, match="labels"):
    resmem_jax.residuals(np.array([0, 1, 4]), logits, 1.0)
  with pytest.raises(ValueError, match="labels"):
    resmem_jax.residuals(np.array([0.0, 1.0, 2.0]), logits, 1.0)
  with pytest.raises(ValueError, match="logits contains NaN"):
    resmem_jax.residuals(np.zeros(3, int), np.full((3, 4), np.nan, np.float32), 1.0)
  with pytest.raises(ValueError, match="logits must have 2"):
    resmem_jax.residuals(np.zeros(3, int), np.zeros(3, np.float32), 1.0)
  with pytest.raises(ValueError, match="shape"):
    resmem_jax.regression_residuals(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="targets contains NaN"):
    resmem_jax.regression_residuals(np.array([np.inf]), np.zeros(1))
