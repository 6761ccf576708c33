"""The validation sweep against a direct NumPy evaluation of every grid point."""
import numpy as np
import pytest

from resmem_jax import hparams


def _numpy_accuracy(d, idx, tr_logits, tr_labels, v_logits, v_labels, k, sigma, t):
  def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
  c = tr_logits.shape[1]
  res = np.eye(c)[tr_labels] - softmax(tr_logits / t)
  w = softmax(-d[:, :k] / sigma)
  pred = softmax(v_logits / t) + np.einsum("qk,qkc->qc", w, res[idx[:, :k]])
  acc = np.mean(pred.argmax(-1) == v_labels)
  sq = np.mean(np.sum((pred - np.eye(c)[v_labels]) ** 2, -1))
  return acc, sq


def test_sweep_matches_numpy_reference():
  rng = np.random.default_rng(0)
  n, q, c, kmax = 200, 37, 5, 8
  tr_logits = rng.normal(size=(n, c)).astype(np.float32)
  tr_labels = rng.integers(0, c, n)
  v_logits = rng.normal(size=(q, c)).astype(np.float32)
  v_labels = rng.integers(0, c, q)
  d = np.sort(rng.uniform(0.1, 2.0, size=(q, kmax)), axis=1).astype(np.float32)
  idx = rng.integers(0, n, size=(q, kmax))
  points = hparams.sweep(d, idx, tr_logits, tr_labels, v_logits, v_labels,
                         k_grid=[1, 3, 8], sigma_grid=[0.05, 0.5, 5.0],
                         temperature_grid=[0.5, 2.0], chunk_elements=64)  # several chunks
  assert len(points) == 3 * 3 * 2
  for p in points:
    acc, sq = _numpy_accuracy(d, idx, tr_logits, tr_labels, v_logits, v_labels,
                              p.k, p.sigma, p.temperature)
    assert p.accuracy == pytest.approx(acc, abs=1e-6)
    assert p.squared_loss == pytest.approx(sq, rel=1e-4)
  chosen = hparams.best(points)
  assert chosen.accuracy == max(p.accuracy for p in points)


def test_sweep_rejects_bad_grids():
  d = np.ones((4, 2), np.float32)
  idx = np.zeros((4, 2), np.int64)
  logits = np.zeros((5, 3), np.float32)
  args = (d, idx, logits, np.zeros(5, int), np.zeros((4, 3), np.float32), np.zeros(4, int))
  with pytest.raises(ValueError, match="k_grid"):
    hparams.sweep(*args, k_grid=[4], sigma_grid=[1.0], temperature_grid=[1.0])
  with pytest.raises(ValueError, match="sigma_grid"):
    hparams.sweep(*args, k_grid=[1], sigma_grid=[0.0], temperature_grid=[1.0])
  with pytest.raises(ValueError, match="temperature_grid"):
    hparams.sweep(*args, k_grid=[1], sigma_grid=[1.0], temperature_grid=[-1.0])
