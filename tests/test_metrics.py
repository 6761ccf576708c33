"""Risk measures against plain NumPy definitions."""
import numpy as np
import pytest

from resmem_jax import metrics


def test_metrics_match_numpy():
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(50, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 50)
  mask = rng.random(50) < 0.7
  acc = np.mean((pred.argmax(-1) == labels)[mask])
  assert float(metrics.accuracy(pred, labels, mask)) == pytest.approx(acc, abs=1e-6)
  assert float(metrics.zero_one_error(pred, labels, mask)) == pytest.approx(1 - acc, abs=1e-6)
  sq = np.sum((pred - np.eye(7)[labels]) ** 2, -1)[mask].mean()
  assert float(metrics.squared_loss(pred, labels, mask)) == pytest.approx(sq, rel=1e-5)
  clipped = np.maximum(pred, 1e-6)
  probs = clipped / clipped.sum(-1, keepdims=True)
  ll = -np.log(probs[np.arange(50), labels])[mask].mean()
  assert float(metrics.log_loss(pred, labels, mask)) == pytest.approx(ll, rel=1e-5)


def test_log_loss_is_identity_rule_on_distributions():
  p = np.array([[0.2, 0.5, 0.3]], np.float32)
  np.testing.assert_allclose(np.asarray(metrics.to_distribution(p)), p, rtol=1e-6)
  assert float(metrics.log_loss(p, np.array([1]))) == pytest.approx(-np.log(0.5), rel=1e-6)


def test_label_score_form_equals_full_form():
  rng = np.random.default_rng(2)
  pred = rng.normal(size=(10, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 10)
  full = np.asarray(metrics.log_loss(pred, labels))
  clipped_sum = np.maximum(pred, 1e-6).sum(-1)
  per = metrics.log_loss_from_label_score(pred[np.arange(10), labels], clipped_sum)
  assert float(np.mean(per)) == pytest.approx(float(full), rel=1e-5)
